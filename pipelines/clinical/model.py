"""A causal LM with a classification head: the same backbone (and its adapters) serves the causal-LM
objective of stage 1 and the classification objective of stage 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional

__all__ = ["ClinicalModel", "classification_loss", "scores_from_logits", "predict_scores", "num_outputs"]

Pooling = Literal["last", "mean"]


def num_outputs(task: str, num_classes: int) -> int:
    """Return the head width: 1 for binary, one per class (multiclass) or label (multilabel)."""
    return 1 if task == "binary" else num_classes


class ClinicalModel(nn.Module):
    """Backbone ``lm`` (a transformers causal LM) plus a linear ``classifier`` on pooled hidden states.

    Adapters are added to ``lm``'s layers (``model.lm``), so they can be exported on their own against
    the bare causal LM (HF peft format included). The head is the module named ``classifier``.

    When the bottom ``cached_layers`` decoder layers hold no adapter, their output (``prefix``) does not
    change during training: compute it once with :meth:`prefix_states` and pass it instead of the tokens;
    only the top layers then run in every step. The results equal the full forward pass. Prefix tuning and
    P-tuning (held by the LM's token embedding) act on the LM's call and change every layer: no cache then.
    """

    def __init__(self, lm: Any, outputs: int, pooling: Pooling = "last", seed: int = 0) -> None:
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got '{pooling}'")
        self.lm = lm
        self.pooling = pooling
        self.cached_layers = 0
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.classifier = nn.Linear(int(lm.config.hidden_size), outputs)

    @property
    def decoder(self) -> Any:
        """The transformer body (``LlamaModel``): embeddings, ``layers``, final ``norm``."""
        return self.lm.base_model

    @contextmanager
    def _layers(self, start: int, stop: int | None, final_norm: bool) -> Iterator[None]:
        decoder = self.decoder
        layers, norm = decoder.layers, decoder.norm
        decoder.layers = nn.ModuleList(list(layers)[start:stop])
        if not final_norm:
            decoder.norm = nn.Identity()
        try:
            yield
        finally:
            decoder.layers, decoder.norm = layers, norm

    @contextmanager
    def _head_set_aside(self) -> Iterator[None]:
        head = self.lm.get_output_embeddings()
        self.lm.set_output_embeddings(nn.Identity())
        try:
            yield
        finally:
            self.lm.set_output_embeddings(head)

    @torch.no_grad()
    def prefix_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the hidden states after the bottom ``cached_layers`` layers ``(batch, T, hidden)``."""
        if self.cached_layers <= 0:
            raise ValueError(
                "cached_layers is 0: there is no frozen prefix to compute; pass input_ids instead"
            )
        with self._layers(0, self.cached_layers, final_norm=False):
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the final (normed) hidden states, from tokens or from cached prefix states."""
        if prefix is None:
            # Through the causal LM, not only its body: prefix tuning and P-tuning rewrite the LM's call (a
            # hook on it). With its head set aside the LM's "logits" are the final hidden states; P-tuning
            # puts its prompt's positions first, so the note's are the last ones.
            with self._head_set_aside():
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits[:, -input_ids.shape[1] :]
        with self._layers(self.cached_layers, None, final_norm=True):
            out = self.decoder(inputs_embeds=prefix, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return pooled last hidden states ``(batch, hidden)``: the last real token's, or the masked mean."""
        hidden = self.hidden_states(input_ids, attention_mask, prefix)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = attention_mask.to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        # Position of the last real token, whichever side the padding is on.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp_min(0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return classification logits ``(batch, outputs)``."""
        pooled = self.features(input_ids, attention_mask, prefix)
        return self.classifier(pooled.to(self.classifier.weight.dtype))

    def token_losses(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return next-token cross-entropy ``(batch, T-1)`` and the mask of real target tokens.

        With P-tuning the targets are the same T-1 tokens as without it (HF peft also scores token 0 from
        the prompt's last position), so perplexity before and after a stage compares the same tokens.
        """
        hidden = self.hidden_states(input_ids, attention_mask, prefix)
        logits = self.lm.lm_head(hidden[:, :-1]).float()
        targets = input_ids[:, 1:]
        nll = functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        if attention_mask is None:
            return nll, torch.ones_like(nll)
        real = attention_mask[:, 1:].to(nll.dtype)
        return nll * real, real

    def lm_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the mean next-token cross-entropy over real tokens."""
        nll, real = self.token_losses(input_ids, attention_mask, prefix)
        return nll.sum() / real.sum().clamp_min(1.0)

    def token_nll(self, input_ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Return the summed next-token negative log-likelihood of each full block ``(batch,)``."""
        return self.token_losses(input_ids, None, prefix)[0].sum(dim=1)


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, task: str, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the loss of a task: BCE (binary, ``weights`` = pos_weight), CE (multiclass, ``weights`` =
    class weights) or per-label BCE (multilabel, ``weights`` = per-label pos_weight)."""
    if task == "binary":
        return functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), pos_weight=weights)
    if task == "multiclass":
        return functional.cross_entropy(logits, labels.long(), weight=weights)
    if task == "multilabel":
        return functional.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weights)
    raise ValueError(f"task must be binary, multiclass or multilabel, got '{task}'")


def scores_from_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Return scores: the positive probability ``(n,)`` for binary, softmax or sigmoid ``(n, k)``."""
    if task == "binary":
        return torch.sigmoid(logits[:, 0])
    if task == "multiclass":
        return torch.softmax(logits, dim=-1)
    return torch.sigmoid(logits)


@torch.inference_mode()
def predict_scores(model: ClinicalModel, loader: Any, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Run the model over a DataLoader of padded batches.

    Returns:
        ``(y_true, y_score)`` as numpy arrays, scores in float64.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    truths, scores = [], []
    for batch in loader:
        prefix = batch["prefix"].to(device) if "prefix" in batch else None
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), prefix)
        scores.append(scores_from_logits(logits.float(), task).cpu().double().numpy())
        truths.append(batch["labels"].numpy())
    model.train(was_training)
    return np.concatenate(truths), np.concatenate(scores)
