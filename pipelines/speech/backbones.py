"""Speech backbones: the FSDD multi-speaker acoustic model (trained once, cached) and tiny random models.

``fsdd_multispeaker`` is trained by :func:`train_fsdd_base` on the FSDD training split (clip indices
5-49) of five speakers, the sixth (``held_out_speaker``) being kept for adaptation; the result is cached
under ``$PEFT_PIPELINES_CACHE/speech/`` keyed by every setting below, so the demo recipe finds the base
the base recipe trained when both use the same settings. transformers TTS models (SpeechT5,
FastSpeech2Conformer) are in :mod:`pipelines.speech.hf_tts`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipelines.speech.cache import entry_dir, load_entry, save_entry
from pipelines.speech.data import FSDD_SHA256, FSDD_SPEAKERS, Example, collate_examples
from pipelines.speech.model import AcousticConfig, AcousticModel

__all__ = [
    "BaseSettings",
    "Backbone",
    "train_fsdd_base",
    "load_fsdd_base",
    "tiny_random_model",
    "load_backbone",
    "loaded_train_result",
]

logger = logging.getLogger(__name__)
BASE_VERSION = 1


class BaseSettings(BaseModel):
    """How the FSDD base model is built and trained (``backbone.options`` of the speech recipes)."""

    model_config = ConfigDict(extra="forbid")
    held_out_speaker: str = Field("yweweler", description="FSDD speaker left out of the base (the target).")
    hidden: int = Field(128, ge=4, description="Channels of the encoder, predictors and decoder.")
    encoder_layers: int = Field(3, ge=1, description="Convolution blocks of the character encoder.")
    decoder_layers: int = Field(4, ge=1, description="Convolution blocks of the mel decoder.")
    steps: int = Field(800, ge=1, description="Optimiser steps of base training.")
    batch_size: int = Field(32, ge=1, description="Clips per base training step.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate of base training (cosine schedule).")
    seed: int = Field(0, ge=0, description="Seed of base training.")
    train_if_missing: bool = Field(
        True, description="Train the base (minutes) when no cached one matches; false: stop with a message."
    )

    def cache_settings(self) -> dict:
        """The settings that determine the weights (all but train_if_missing), with data and version."""
        return self.model_dump(exclude={"train_if_missing"}) | {"data": FSDD_SHA256, "version": BASE_VERSION}

    def speakers(self) -> list[str]:
        """The base model's speakers, in speaker-id order."""
        if self.held_out_speaker not in FSDD_SPEAKERS:
            raise ValueError(
                f"held_out_speaker '{self.held_out_speaker}' is not an FSDD speaker; "
                f"use one of {FSDD_SPEAKERS}"
            )
        return [s for s in FSDD_SPEAKERS if s != self.held_out_speaker]


@dataclass
class Backbone:
    """An acoustic model with its speakers and provenance."""

    model: AcousticModel
    speakers: list[str]
    info: dict = field(default_factory=dict)
    train_result: Any = None  # the TrainResult when this process trained it (None: loaded)

    def report_info(self) -> dict:
        """The report's ``backbone`` entry: its provenance and training facts, without the loss history."""
        return {k: v for k, v in self.info.items() if k != "history"}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def set_mel_statistics(model: AcousticModel, examples: list[Example]) -> None:
    """Store the per-bin mean and standard deviation of the examples' log-mels in the model."""
    stacked = torch.cat([e.mel for e in examples])
    model.mel_mean.copy_(stacked.mean(dim=0))
    model.mel_std.copy_(stacked.std(dim=0).clamp(min=1e-3))


def acoustic_loss(model: AcousticModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of an AcousticModel (a plain function so it pickles and reads well)."""
    return model.loss(batch)


def train_fsdd_base(
    settings: BaseSettings, examples: list[Example], run_dir=None, resume: bool = False
) -> tuple[AcousticModel, dict]:
    """Train the multi-speaker base on training examples of the base speakers with the core loop
    (``resume``: continue from the checkpoint in ``run_dir``).

    Returns:
        The model (eval mode) and facts (steps, wall time, final loss, history, the TrainResult).
    """
    from pipelines.core.training import TrainConfig, train

    torch.manual_seed(settings.seed)
    config = AcousticConfig(
        num_speakers=len(settings.speakers()),
        hidden=settings.hidden,
        encoder_layers=settings.encoder_layers,
        decoder_layers=settings.decoder_layers,
    )
    model = AcousticModel(config)
    set_mel_statistics(model, examples)
    train_config = TrainConfig(
        max_steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        warmup_ratio=0.05,
        log_every=50,
    )
    start = time.perf_counter()
    result = train(
        model,
        _Examples(examples),
        loss_fn=acoustic_loss,
        config=train_config,
        run_dir=run_dir,
        resume=resume and run_dir is not None,
        collate_fn=collate_examples,
        seed=settings.seed,
        progress=False,
    )
    model.eval()
    losses = [row["loss"] for row in result.history if "loss" in row]
    facts = {
        "steps": result.steps,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "train_clips": len(examples),
        "history": result.history,
        "result": result,
    }
    return model, facts


def load_fsdd_base(settings: BaseSettings, examples_fn=None, run_dir=None, resume: bool = False) -> Backbone:
    """The cached FSDD base for these settings, trained first when absent and allowed.

    Args:
        settings: Base settings (the cache key).
        examples_fn: Called without arguments to get the training examples when training is needed.
        run_dir: Where base training writes its metrics and checkpoint when it runs.
        resume: Continue an interrupted base training from its checkpoint in ``run_dir``.

    Raises:
        FileNotFoundError: No cached base matches and ``train_if_missing`` is false.
    """
    folder = entry_dir("fsdd_multispeaker", settings.cache_settings())
    cached = load_entry(folder)
    if cached is not None:
        state, meta = cached
        model = AcousticModel(AcousticConfig(**meta["config"]))
        model.load_state_dict(state)
        return Backbone(model.eval(), meta["speakers"], _info(folder, meta, cached=True))
    if not settings.train_if_missing:
        raise FileNotFoundError(
            f"no cached FSDD base model at {folder}; run `peft-pipelines run recipes/speech/"
            "fsdd_base_multispeaker.yaml` first (same backbone options) or set train_if_missing: true"
        )
    if examples_fn is None:
        raise ValueError("load_fsdd_base needs examples_fn to train the missing base model")
    logger.warning("no cached FSDD base model for these settings: training it now (a few minutes)")
    model, facts = train_fsdd_base(settings, examples_fn(), run_dir, resume)
    meta = {
        "config": model.config.to_dict(),
        "speakers": settings.speakers(),
        "settings": settings.cache_settings(),
        "training": {k: v for k, v in facts.items() if k not in ("history", "result")},
    }
    save_entry(folder, model, meta)
    backbone = Backbone(model, meta["speakers"], _info(folder, meta, cached=False), facts["result"])
    backbone.info["history"] = facts["history"]
    return backbone


def _info(folder, meta: dict, cached: bool) -> dict:
    from pipelines.core.data import sha256_file

    weights = folder / "model.safetensors"
    return {
        "name": "fsdd_multispeaker",
        "source": "trained by this package on the FSDD training split of "
        f"{len(meta['speakers'])} speakers ({', '.join(meta['speakers'])})",
        "weights": f"{weights} sha256 {sha256_file(weights)}",
        "cached": cached,
        "training": meta.get("training", {}),
    }


def tiny_random_model(num_speakers: int = 2, seed: int = 0) -> AcousticModel:
    """A tiny random AcousticModel (hidden 16, one block each) for tests and quick runs."""
    torch.manual_seed(seed)
    config = AcousticConfig(
        num_speakers=num_speakers,
        hidden=16,
        encoder_layers=1,
        duration_layers=1,
        decoder_layers=1,
        dropout=0.0,
    )
    return AcousticModel(config).eval()


def load_backbone(
    name: str, settings: BaseSettings | None = None, examples_fn=None, run_dir=None, resume: bool = False
) -> Backbone:
    """A speech backbone by name: ``fsdd_multispeaker`` or ``test_tiny`` (random, 5 speakers)."""
    settings = settings or BaseSettings()
    if name == "fsdd_multispeaker":
        return load_fsdd_base(settings, examples_fn, run_dir, resume)
    if name == "test_tiny":
        speakers = settings.speakers()
        return Backbone(
            tiny_random_model(len(speakers), settings.seed),
            speakers,
            {"name": name, "source": "tiny test model", "weights": "random initialisation"},
        )
    raise ValueError(
        f"unknown speech backbone '{name}'; use fsdd_multispeaker or test_tiny "
        "(SpeechT5 / FastSpeech2Conformer: hf:<hub id> or a local folder, see pipelines.speech.hf_tts)"
    )


def loaded_train_result(training: dict) -> Any:
    """The TrainResult of a base loaded from the cache (``training``: its cached facts): nothing trained in
    this run."""
    from pipelines.core.training import TrainResult

    return TrainResult(
        steps=0, epochs=0.0, history=[], best_metric=None, best_step=None, metric_name="loss",
        stopped_early=False, restored_best=False, wall_time_s=0.0, peak_memory_bytes=0,
        samples_per_second=0.0, precision="fp32", checkpoint=None,
        notes=[f"loaded from the cache (trained earlier: {training.get('steps')} steps)"],
    )  # fmt: skip
