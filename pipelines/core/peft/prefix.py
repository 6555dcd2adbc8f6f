"""Prefix tuning: trained keys and values put before every attention layer's own, through the model's cache.

Supported models: LlamaForCausalLM, LlamaModel and BertModel (HF peft 0.21 supports the same under
transformers 5; an EsmModel takes no key-value cache, so it is refused). As HF peft: the prefix encoder gives
(num_tokens, layers x 2 x key-value width), reshaped into one (key, value) pair per layer of
(batch, key-value heads, num_tokens, head width) in a DynamicCache passed as the model's cache, with the
attention mask extended by num_tokens ones (position_ids, when given, shifted by num_tokens; the model shifts
its own positions by the cache length). Grouped-query models get prefixes of their key-value heads only.
Outputs keep the input's length. During generation a call whose cache already holds this prefix (the cache
this model returned) only extends the mask. The encoder is HF peft's PrefixEncoder (its `transform` is our
`projection`).
"""

from __future__ import annotations

import torch
from torch import nn

from . import model_call
from .specs import PrefixTuning

SUPPORTED = ("LlamaForCausalLM", "LlamaModel", "BertModel")
_TAG = "peft_prefix_tokens"  # set on a cache this adapter filled


def key_value_shape(config) -> tuple[int, int, int]:
    """(layers, key-value heads, head width) of a transformers config, as HF peft reads them."""
    heads = config.num_attention_heads
    head_width = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_width


class PrefixAdapter(nn.Module):
    """The prefix encoder: an embedding of keys and values, or of tokens mapped by Linear, tanh, Linear."""

    kind = "transform"  # the embedding's own output is unchanged; the owner's call is what changes
    mergeable = False

    def __init__(self, base: nn.Module, spec: PrefixTuning, name: str):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise ValueError(
                f"Prefix tuning is held by a model's token embedding; {name!r} is a {type(base).__name__}."
            )
        self.merged, self.spec = False, spec

    def transform(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def attach(self, model: nn.Module, host: str) -> None:
        """Sizes the encoder from the owning model's config and registers the call rewrite."""
        owner = model_call.find_owner(model, host, "Prefix tuning", SUPPORTED)[0]
        self.layers, self.heads, self.head_width = key_value_shape(owner.config)
        width, n = self.heads * self.head_width, self.spec.num_tokens
        self.encoder_hidden_size = self.spec.encoder_hidden_size or width
        if self.spec.prefix_projection:
            self.embedding = nn.Embedding(n, width)
            hidden = self.encoder_hidden_size
            self.projection = nn.Sequential(
                nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, self.layers * 2 * width)
            )
        else:
            self.embedding = nn.Embedding(n, self.layers * 2 * width)
        model_call.attach(self, model, host, "Prefix tuning", SUPPORTED)

    def key_values(self) -> torch.Tensor:
        """The (num_tokens, layers x 2 x key-value width) prefix."""
        if self.spec.prefix_projection:
            return self.projection(self.embedding.weight)
        return self.embedding.weight

    def exported(self) -> torch.Tensor:
        """What an HF peft file holds: the prefix (`prompt_embeddings`)."""
        with torch.no_grad():
            return self.key_values().detach().float().cpu().contiguous()

    def _fill(self, cache, batch: int, dtype: torch.dtype) -> object:
        n = self.spec.num_tokens
        prefix = self.key_values().to(dtype).view(n, 2 * self.layers, self.heads, self.head_width)
        prefix = prefix.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        for layer in range(self.layers):
            cache.update(prefix[2 * layer], prefix[2 * layer + 1], layer)
        setattr(cache, _TAG, n)
        return cache

    def rewrite_call(self, owner: nn.Module, args: tuple, kwargs: dict):
        if not model_call.in_use(self):
            return None
        from transformers import DynamicCache

        if owner.training and any(getattr(m, "gradient_checkpointing", False) for m in owner.modules()):
            raise ValueError(
                f"Prefix tuning cannot train {type(owner).__name__} with gradient checkpointing (recomputed "
                "layers would add the prefix twice), as in HF peft; turn it off."
            )
        call = model_call.keyword_call(owner, args, kwargs)
        name, n = model_call.cache_argument(owner, call), self.spec.num_tokens
        cache = call.get(name)
        if cache is not None and cache.get_seq_length() > 0:
            if getattr(cache, _TAG, None) != n:
                raise ValueError(
                    f"The {name} given to {type(owner).__name__} holds tokens but not this adapter's prefix; "
                    "pass none, or the cache this model returned."
                )
        else:
            reference = owner.get_input_embeddings().weight
            device = reference.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else reference.dtype
            cache = cache if cache is not None else DynamicCache(config=owner.config)
            call[name] = self._fill(cache, model_call.batch_size(call), dtype)
        call["attention_mask"] = model_call.prepend(call.get("attention_mask"), n, 1)
        if call.get("position_ids") is not None:
            call["position_ids"] = call["position_ids"] + n
        return (), {key: value for key, value in call.items() if value is not None or key in kwargs}
