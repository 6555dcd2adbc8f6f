"""An image classifier: a backbone feature extractor and a linear head, with its loss and scores."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipelines.imaging.backbones import Backbone

__all__ = ["ImageClassifier", "HEAD", "classification_loss", "predict_scores"]

HEAD = "head"  # module name of the classification head (trained fully in every method)


class ImageClassifier(nn.Module):
    """Backbone features -> dropout -> linear head.

    Binary tasks use one logit per class (two), so one softmax serves binary and multiclass; multilabel
    tasks use one sigmoid logit per label.
    """

    def __init__(self, backbone: Backbone, num_outputs: int, task: str = "binary", dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone.module
        self.task = task
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(images)))


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy for binary/multiclass, binary cross-entropy for multilabel; a ``loss_fn`` for train()."""
    device = next(model.parameters()).device
    logits = model(batch["image"].to(device))
    labels = batch["label"].to(device)
    if model.task == "multilabel":
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    return nn.functional.cross_entropy(logits, labels.long())


@torch.no_grad()
def predict_scores(model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """Run the model over a loader in eval mode.

    Returns:
        (y_true, y_score): for binary, the positive-class probability (N,); multiclass, class
        probabilities (N, C); multilabel, per-label probabilities (N, K).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    truths, scores = [], []
    for batch in loader:
        logits = model(batch["image"].to(device)).float()
        if model.task == "multilabel":
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=-1)
            if model.task == "binary":
                probs = probs[:, 1]
        scores.append(probs.cpu().numpy())
        truths.append(batch["label"].cpu().numpy())
    model.train(was_training)
    return np.concatenate(truths), np.concatenate(scores)
