"""An ESM backbone with a task head: per-sequence regression or classification, per-residue classification.

The head lives in ``self.head`` (train it with ``set_trainable(model, [...], extra=["head"])``); the
backbone in ``self.backbone``. Pooling ignores CLS, EOS and padding (``mean``) or takes the CLS/BOS
token (``bos``), so a sequence's prediction does not depend on the batch it is in.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.protein.data import IGNORE_INDEX

__all__ = ["ProteinModel", "TaskHead", "TASKS", "residue_mask", "target_statistics"]

TASKS = ("regression", "binary", "multiclass", "residue")


def residue_mask(tokens: torch.Tensor, vocabulary: Any) -> torch.Tensor:
    """True at residue positions (not CLS, EOS or padding)."""
    special = (tokens == vocabulary.padding_index) | (tokens == vocabulary.cls_index)
    return ~(special | (tokens == vocabulary.eos_index))


def target_statistics(records: list[Any], task: str) -> tuple[float, float]:
    """The mean and standard deviation a regression head standardises its targets with (those of the
    training ``records``; a constant target's deviation is 1); (0, 1) for a classification task."""
    if task != "regression":
        return 0.0, 1.0
    targets = np.asarray([record.target for record in records], dtype=np.float64)
    return float(targets.mean()), float(targets.std()) or 1.0


class TaskHead(nn.Module):
    """A linear layer plus the regression target scale, so saving the head saves both."""

    def __init__(self, hidden_size: int, outputs: int, target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(hidden_size, outputs)
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std) or 1.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class ProteinModel(nn.Module):
    """Backbone + pooling + linear head.

    Args:
        backbone: A backbone from :func:`pipelines.protein.backbones.load_backbone`.
        task: ``regression``, ``binary``, ``multiclass`` or ``residue`` (per-residue classification).
        num_classes: Classes of a classification task (2 for binary).
        pooling: ``mean`` over residues or ``bos`` (the CLS token) for per-sequence tasks.
        target_mean: Regression targets are standardised with this mean and ``target_std`` during
            training; predictions are returned on the original scale.
        target_std: See ``target_mean``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        task: str,
        num_classes: int = 2,
        pooling: Literal["mean", "bos"] = "mean",
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown protein task '{task}'; choose one of {', '.join(TASKS)}")
        if pooling not in ("mean", "bos"):
            raise ValueError(f"unknown pooling '{pooling}'; choose mean or bos")
        if task != "regression" and num_classes < 2:
            raise ValueError(f"a {task} task needs num_classes >= 2, got {num_classes}")
        self.backbone = backbone
        self.task = task
        self.pooling = pooling
        self.num_classes = num_classes
        outputs = 1 if task == "regression" else num_classes
        self.head = TaskHead(backbone.hidden_size, outputs, target_mean, target_std)

    @property
    def vocabulary(self) -> Any:
        return self.backbone.vocabulary

    def pool(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, hidden) -> (batch, hidden)."""
        if self.pooling == "bos":
            return hidden[:, 0]
        mask = residue_mask(tokens, self.vocabulary).unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled (per-sequence tasks) or per-token (residue task) backbone features."""
        hidden = self.backbone(tokens)
        return hidden if self.task == "residue" else self.pool(hidden, tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Standardised regression outputs (batch,), class logits (batch, C) or (batch, tokens, C)."""
        out = self.head(self.features(tokens))
        return out.squeeze(-1) if self.task == "regression" else out

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task loss of one batch: MSE on standardised targets, or cross-entropy."""
        device = self.head.linear.weight.device
        output = self(batch["tokens"].to(device))
        if self.task == "regression":
            target = (batch["target"].to(device) - self.head.target_mean) / self.head.target_std
            return F.mse_loss(output.float(), target)
        if self.task == "residue":
            labels = batch["labels"].to(device)
            return F.cross_entropy(output.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return F.cross_entropy(output.float(), batch["target"].to(device))

    def masked_lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the backbone's language-model head on the masked residues."""
        device = self.head.linear.weight.device
        logits = self.backbone.masked_lm_logits(batch["tokens"].to(device))
        labels = batch["labels"].to(device)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray | None, np.ndarray]:
        """``(y_true, y_score)`` of one batch: regression values, class probabilities (positive class
        for binary), or per-residue probabilities of the scored residues only."""
        device = self.head.linear.weight.device
        output = self(batch["tokens"].to(device)).float()
        if self.task == "regression":
            score = output * self.head.target_std + self.head.target_mean
            truth = batch.get("target")
            return (None if truth is None else truth.numpy()), score.cpu().numpy()
        probabilities = output.softmax(-1)
        if self.task == "residue":
            labels = batch["labels"].to(device)
            keep = labels != IGNORE_INDEX
            probabilities, truth = probabilities[keep], labels[keep].cpu().numpy()
        else:
            truth = batch["target"].numpy() if "target" in batch else None
        if self.num_classes == 2:
            probabilities = probabilities[..., 1]
        return truth, probabilities.cpu().numpy()

    def predict(self, loader: Any) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate :meth:`predict_batch` over a DataLoader (eval mode, restored afterwards)."""
        was_training = self.training
        self.eval()
        truths, scores = [], []
        try:
            for batch in loader:
                truth, score = self.predict_batch(batch)
                scores.append(score)
                if truth is not None:
                    truths.append(truth)
        finally:
            self.train(was_training)
        y_true = np.concatenate(truths) if truths else np.array([])
        return y_true, np.concatenate(scores)
