"""Evaluation models trained on real FSDD audio: a speaker-ID model and a spoken-digit classifier.

Both read the log-mel bins below 4 kHz (FSDD is 8 kHz audio), standardised per bin with statistics of
their training clips, through two convolutions, mean-and-standard-deviation pooling over time, a
64-dimensional embedding layer and a linear classifier, trained with random gain (a constant added to the
log-mel) and small Gaussian noise on the log-mel so that level differences of synthesised audio do not
matter. The speaker-ID model is trained on the official FSDD training split (clip indices 5-49) of the
base speakers only: it has never heard the held-out speaker, so its embedding is a held-out-speaker
embedding. The digit classifier is trained on the training split of all six speakers (the held-out
speaker's adaptation clips included; it judges words, not voices). Speaker similarity is the cosine
between the speaker-ID embeddings of a synthesised clip and of the recording with the same text;
intelligibility is the digit classifier's accuracy on synthesised clips.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipelines.speech.audio import mel_bins_below
from pipelines.speech.cache import entry_dir, load_entry, save_entry
from pipelines.speech.data import FSDD_SHA256, FSDD_SPEAKERS, Example

__all__ = ["UtteranceClassifier", "Evaluators", "train_classifier", "load_evaluators"]

EVALUATOR_VERSION = 2  # 2: the speaker-ID model trains on the base speakers only


class UtteranceClassifier(nn.Module):
    """Log-mel (B, T, bins) -> embedding (B, 64) -> logits (B, classes)."""

    def __init__(self, num_bins: int, num_classes: int, hidden: int = 64, embedding: int = 64) -> None:
        super().__init__()
        self.num_bins = num_bins
        self.register_buffer("mean", torch.zeros(num_bins))
        self.register_buffer("std", torch.ones(num_bins))
        self.conv1 = nn.Conv1d(num_bins, hidden, 5, padding=2)
        self.conv2 = nn.Conv1d(hidden, hidden, 5, padding=2)
        self.embedding = nn.Linear(2 * hidden, embedding)
        self.classifier = nn.Linear(embedding, num_classes)

    def embed(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Utterance embeddings of padded log-mels (only the first ``num_bins`` bins are read)."""
        x = (mels[..., : self.num_bins] - self.mean) / self.std
        mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).float()[:, None]  # (B, 1, T)
        h = torch.relu(self.conv1(x.transpose(1, 2) * mask))
        h = torch.relu(self.conv2(h * mask)) * mask
        count = mask.sum(dim=2).clamp(min=1)
        mean = h.sum(dim=2) / count
        std = ((((h - mean[..., None]) * mask) ** 2).sum(dim=2) / count + 1e-5).sqrt()
        return self.embedding(torch.cat([mean, std], dim=1))

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.embed(mels, lengths)))


def _pad(mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(m) for m in mels])
    out = torch.full((len(mels), int(lengths.max()), mels[0].shape[1]), float(np.log(1e-5)))
    for i, mel in enumerate(mels):
        out[i, : len(mel)] = mel
    return out, lengths


class _LabelledMels(torch.utils.data.Dataset):
    def __init__(self, mels: list[torch.Tensor], labels: list[int]) -> None:
        self.mels, self.labels = mels, labels

    def __len__(self) -> int:
        return len(self.mels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.mels[index], self.labels[index]


def _collate(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    mels, lengths = _pad([m for m, _ in items])
    return {"mels": mels, "lengths": lengths, "labels": torch.tensor([label for _, label in items])}


def train_classifier(
    mels: list[torch.Tensor],
    labels: list[int],
    num_classes: int,
    epochs: int = 8,
    seed: int = 0,
    num_bins: int | None = None,
) -> tuple[UtteranceClassifier, dict]:
    """Train an UtteranceClassifier with the core training loop; returns it (eval mode) and facts."""
    from pipelines.core.training import TrainConfig, train

    num_bins = num_bins or mel_bins_below(4000.0)
    model = UtteranceClassifier(num_bins, num_classes)
    stacked = torch.cat([m[:, :num_bins] for m in mels])
    model.mean.copy_(stacked.mean(dim=0))
    model.std.copy_(stacked.std(dim=0).clamp(min=1e-3))
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(model: UtteranceClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        gain = (torch.rand(len(batch["mels"]), 1, 1, generator=generator) - 0.5) * 1.0
        noise = 0.1 * torch.randn(batch["mels"].shape, generator=generator)
        logits = model(batch["mels"] + gain + noise, batch["lengths"])
        return nn.functional.cross_entropy(logits, batch["labels"])

    config = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, log_every=1000)
    start = time.perf_counter()
    result = train(
        model,
        _LabelledMels(mels, labels),
        loss_fn=loss_fn,
        config=config,
        collate_fn=_collate,
        seed=seed,
        progress=False,
    )
    model.eval()
    facts = {"steps": result.steps, "epochs": epochs, "wall_time_s": round(time.perf_counter() - start, 2)}
    return model, facts


@torch.no_grad()
def accuracy(model: UtteranceClassifier, mels: list[torch.Tensor], labels: list[int]) -> float:
    """Fraction of utterances whose arg-max class equals the label."""
    padded, lengths = _pad(mels)
    return float((model(padded, lengths).argmax(dim=1) == torch.tensor(labels)).float().mean())


@dataclass
class Evaluators:
    """The two FSDD evaluation models and what is known about them."""

    speaker_id: UtteranceClassifier
    digit: UtteranceClassifier
    meta: dict

    @torch.no_grad()
    def speaker_embeddings(self, mels: list[torch.Tensor]) -> torch.Tensor:
        """Speaker-ID embeddings (N, 64) of log-mels."""
        padded, lengths = _pad(mels)
        return self.speaker_id.embed(padded, lengths)

    @torch.no_grad()
    def digit_predictions(self, mels: list[torch.Tensor]) -> np.ndarray:
        """Predicted digit per log-mel."""
        padded, lengths = _pad(mels)
        return self.digit(padded, lengths).argmax(dim=1).numpy()


def load_evaluators(
    examples_fn: Callable[[], tuple[list[Example], list[Example]]],
    speakers: Sequence[str] | None = None,
    seed: int = 0,
) -> Evaluators:
    """Load the cached evaluators, or train them on FSDD training-split examples (about 20 s) and cache them.

    Args:
        examples_fn: Returns (examples of the FSDD training split of all six speakers, examples of the
            test split, for the held-out accuracies recorded in the meta); called only when training.
        speakers: The speakers the speaker-ID model learns (the base model's; default all six). The
            digit classifier learns from every speaker's training clips.
        seed: Training seed.
    """
    speakers = list(speakers or FSDD_SPEAKERS)
    unknown = [s for s in speakers if s not in FSDD_SPEAKERS]
    if unknown:
        raise ValueError(f"speakers {unknown} are not FSDD speakers; use names from {FSDD_SPEAKERS}")
    settings = {
        "version": EVALUATOR_VERSION,
        "data": FSDD_SHA256,
        "seed": seed,
        "bins": mel_bins_below(4000.0),
        "speaker_id_speakers": speakers,
    }
    folder = entry_dir("fsdd_evaluators", settings)
    num_bins = settings["bins"]
    speaker_id = UtteranceClassifier(num_bins, len(speakers))
    digit = UtteranceClassifier(num_bins, 10)
    cached = load_entry(folder)
    if cached is not None:
        state, meta = cached
        speaker_id.load_state_dict(
            {k[len("speaker_id.") :]: v for k, v in state.items() if k.startswith("speaker_id.")}
        )
        digit.load_state_dict({k[len("digit.") :]: v for k, v in state.items() if k.startswith("digit.")})
        return Evaluators(speaker_id.eval(), digit.eval(), meta | {"cache": str(folder), "cached": True})
    train_examples, test_examples = examples_fn()
    speaker_train = [e for e in train_examples if e.utterance.speaker in speakers]
    speaker_test = [e for e in test_examples if e.utterance.speaker in speakers]
    speaker_id, speaker_facts = train_classifier(
        [e.mel for e in speaker_train],
        [speakers.index(e.utterance.speaker) for e in speaker_train],
        len(speakers),
        seed=seed,
    )
    digit, digit_facts = train_classifier(
        [e.mel for e in train_examples], [int(e.utterance.digit) for e in train_examples], 10, seed=seed
    )
    meta = {
        "settings": settings,
        "speaker_id": speaker_facts
        | {
            "speakers": speakers,
            "never_heard": [s for s in FSDD_SPEAKERS if s not in speakers],
            "train_clips": len(speaker_train),
            "test_accuracy": accuracy(
                speaker_id,
                [e.mel for e in speaker_test],
                [speakers.index(e.utterance.speaker) for e in speaker_test],
            ),
        },
        "digit": digit_facts
        | {
            "speakers": list(FSDD_SPEAKERS),
            "train_clips": len(train_examples),
            "test_accuracy": accuracy(
                digit, [e.mel for e in test_examples], [int(e.utterance.digit) for e in test_examples]
            ),
        },
        "train_clips": len(train_examples),
        "test_clips": len(test_examples),
    }
    both = nn.ModuleDict({"speaker_id": speaker_id, "digit": digit})
    save_entry(folder, both, meta)
    return Evaluators(speaker_id, digit, meta | {"cache": str(folder), "cached": False})
