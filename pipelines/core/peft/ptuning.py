"""P-tuning: a prompt encoder's output put before the token embeddings of a transformers model, as in HF peft.

Supported models: LlamaForCausalLM, LlamaModel, BertModel and EsmModel. The model is called as before; the
adapter's pre-hook (model_call.py) embeds `input_ids`, puts the prompt first and passes `inputs_embeds`, with
the attention mask, `labels` (-100), `token_type_ids` (0) and `position_ids` (0..n-1, then the given ones
shifted by n) extended by the prompt, so outputs are `num_tokens` positions longer, the prompt's first. HF
peft drops given position and token-type ids instead (the same when they are the defaults). As in HF peft an
EsmModel given `inputs_embeds` skips its embedding module (token-dropout scaling, mask zeroing). During
generation a call whose cache already holds tokens only extends the mask and shifts the positions.
The encoder's parameter names are HF peft's (PromptEncoder), so its state dict loads in either.
"""

from __future__ import annotations

import torch
from torch import nn

from . import model_call
from .specs import PTuning

SUPPORTED = ("LlamaForCausalLM", "LlamaModel", "BertModel", "EsmModel")


class PTuningAdapter(nn.Module):
    """The learned embedding and encoder (MLP or bidirectional LSTM) that give the prompt."""

    kind = "transform"  # the embedding's own output is unchanged; the owner's call is what changes
    mergeable = False

    def __init__(self, base: nn.Module, spec: PTuning, name: str):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise ValueError(
                f"P-tuning targets a model's token embedding; {name!r} is a {type(base).__name__}, not an "
                "Embedding."
            )
        self.merged, self.num_tokens, self.encoder = False, spec.num_tokens, spec.encoder
        width = base.embedding_dim
        hidden = spec.encoder_hidden_size or width
        self.hidden_size = hidden
        self.embedding = nn.Embedding(spec.num_tokens, width)
        if spec.encoder == "lstm":
            layers, dropout = spec.encoder_num_layers, spec.encoder_dropout
            self.lstm_head = nn.LSTM(
                width, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width)
            )
        elif spec.encoder == "mlp":
            self.mlp_head = nn.Sequential(
                nn.Linear(width, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, width),
            )

    def transform(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def attach(self, model: nn.Module, host: str) -> None:
        """Registers the call rewrite on the model that owns the embedding `host`."""
        model_call.attach(self, model, host, "P-tuning", SUPPORTED)

    def prompt(self) -> torch.Tensor:
        """The (num_tokens, width) prompt: the encoder's output on the learned embedding."""
        embeds = self.embedding.weight
        if self.encoder == "lstm":
            return self.mlp_head(self.lstm_head(embeds[None])[0])[0]
        if self.encoder == "mlp":
            return self.mlp_head(embeds)
        return embeds

    def exported(self) -> torch.Tensor:
        """What an HF peft file holds: the encoded prompt (`prompt_embeddings`)."""
        with torch.no_grad():
            return self.prompt().detach().float().cpu().contiguous()

    def rewrite_call(self, owner: nn.Module, args: tuple, kwargs: dict):
        if not model_call.in_use(self):
            return None
        call = model_call.keyword_call(owner, args, kwargs)
        n = self.num_tokens
        cache = call.get(model_call.cache_argument(owner, call))
        call["attention_mask"] = model_call.prepend(call.get("attention_mask"), n, 1)
        positions = call.get("position_ids")
        if cache is not None and cache.get_seq_length() > 0:  # generation: the prompt is in the cache
            if positions is not None:
                call["position_ids"] = positions + n
            return (), call
        embeds = call.pop("inputs_embeds", None)
        ids = call.pop("input_ids", None)
        if embeds is None:
            if ids is None:
                raise ValueError(
                    f"P-tuning needs input_ids or inputs_embeds in the call of {type(owner).__name__}."
                )
            embeds = owner.get_input_embeddings()(ids)
        prompt = self.prompt().to(embeds.dtype)
        call["inputs_embeds"] = torch.cat([prompt.expand(embeds.shape[0], -1, -1), embeds], dim=1)
        call["labels"] = model_call.prepend(call.get("labels"), n, -100)
        call["token_type_ids"] = model_call.prepend(call.get("token_type_ids"), n, 0)
        if positions is not None:
            front = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(
                positions.shape[0], n
            )
            call["position_ids"] = torch.cat([front, positions + n], dim=1)
        return (), {key: value for key, value in call.items() if value is not None or key in kwargs}
