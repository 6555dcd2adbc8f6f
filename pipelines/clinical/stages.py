"""The mechanics shared by the recipe path and lab code: build the model, turn notes into tensors, train
one stage (causal LM or classification) through ``pipelines.core.training``, score, save and load."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from pipelines.clinical.backbones import Backbone
from pipelines.clinical.data import Notes, class_weights
from pipelines.clinical.metrics import held_out_perplexity
from pipelines.clinical.model import ClinicalModel, classification_loss, num_outputs, predict_scores
from pipelines.clinical.options import StageOptions
from pipelines.clinical.tokens import ClassificationSet, LMBlocks, PadCollate, encode_notes, pack_blocks
from pipelines.core.peft import (
    LoRA,
    adapter_names,
    adapter_specs,
    add_adapter,
    load_adapter,
    save_adapter,
    set_trainable,
)
from pipelines.core.peft.layers import AdaptedLayer
from pipelines.core.training import TrainConfig, TrainResult, train

__all__ = [
    "Stage",
    "StageError",
    "build_model",
    "classification_data",
    "lm_data",
    "check_cached_layers",
    "train_stage",
    "score",
    "perplexity_of",
    "save_adapters",
    "load_adapters",
]

HEAD_DIR = "classifier"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class StageError(ValueError):
    """A stage cannot run as configured."""


@dataclass
class Stage:
    """One training stage: the adapter it adds (or none), what trains, the loop settings, its options."""

    name: str
    objective: Literal["causal_lm", "classification"]
    adapter: Any = None
    trainable: list[str] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: StageOptions = field(default_factory=StageOptions)


def build_model(
    backbone: Backbone, task: str, num_classes: int, pooling: str, cached_layers: int = 0, seed: int = 0
) -> ClinicalModel:
    """Return the backbone's LM with a freshly (seeded) initialised head; base weights are frozen."""
    layers = int(backbone.model.config.num_hidden_layers)
    if cached_layers >= layers:
        raise StageError(
            f"backbone.options.cached_layers is {cached_layers} but the backbone has {layers} layers; "
            f"use at most {layers - 1} so the adapters have layers to live in"
        )
    model = ClinicalModel(backbone.model, num_outputs(task, num_classes), pooling=pooling, seed=seed)
    model.cached_layers = cached_layers
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    return model


def classification_data(
    model: ClinicalModel, tokenizer: Any, notes: Notes, max_length: int, batch_size: int = 8
) -> ClassificationSet:
    """Tokenise the first ``max_length`` tokens of each note; attach cached prefix states when enabled."""
    data = ClassificationSet(encode_notes(tokenizer, notes.texts, max_tokens=max_length), notes.labels)
    if model.cached_layers:
        data.attach_prefix(model, batch_size=batch_size)
    return data


def lm_data(
    model: ClinicalModel,
    tokenizer: Any,
    texts: list[str],
    block_length: int,
    max_blocks: int | None,
    batch_size: int = 8,
) -> LMBlocks:
    """Pack notes (each followed by EOS) into full blocks; attach cached prefix states when enabled."""
    wanted = max_blocks if max_blocks is not None else None
    # Tokenise only as many notes as the blocks need (plus one for the cut), a few at a time.
    token_lists: list[list[int]] = []
    total = 0
    for start in range(0, len(texts), 32):
        part = encode_notes(tokenizer, texts[start : start + 32])
        token_lists += part
        total += sum(len(t) + 1 for t in part)
        if wanted is not None and total >= (wanted + 1) * block_length:
            break
    blocks = pack_blocks(token_lists, block_length, int(tokenizer.eos_token_id), max_blocks=max_blocks)
    prefix = LMBlocks.prefix_of(model, blocks, batch_size) if model.cached_layers and len(blocks) else None
    return LMBlocks(blocks, prefix)


def check_cached_layers(model: ClinicalModel) -> None:
    """Raise when an adapter or a trainable parameter feeds the cached prefix states (they would go stale).

    Everything that runs before decoder layer ``cached_layers`` counts: the bottom layers, the token
    embeddings and any other module outside the layers above, the final norm and the LM head. Such a
    setting is refused rather than silently run without the cache: the cache is what makes the shipped
    recipes fit their time budget, and none of them adapts a cached module.
    """
    if not model.cached_layers:
        return
    cached = model.cached_layers
    decoder = model.decoder
    above = [*list(decoder.layers)[cached:], decoder.norm, model.lm.get_output_embeddings()]
    fresh = {id(module) for part in above if part is not None for module in part.modules()}
    for name, module in model.lm.named_modules():
        if id(module) in fresh:
            continue
        trainable = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not (isinstance(module, AdaptedLayer) or trainable):
            continue
        match = _LAYER.search(name + ".")
        where = f"sits in layer {match.group(1)}" if match else "sits before the decoder layers"
        adapted = isinstance(module, AdaptedLayer)
        what = f"adapter on '{name}'" if adapted else f"trainable parameter '{name}.{trainable[0]}'"
        raise StageError(
            f"{what} {where}, below backbone.options.cached_layers = {cached}, so the cached states "
            f"would go stale; adapt or train only layers >= {cached} (e.g. with a 're:' target) or lower "
            "cached_layers (0 turns the cache off)"
        )


def _inner(model: Any) -> ClinicalModel:
    return getattr(model, "module", model)  # DDP / FSDP wrappers keep the model in .module


def _lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return _inner(model).lm_loss(batch["input_ids"], None, batch.get("prefix"))


class _ClassificationLoss:
    def __init__(self, task: str, weights: torch.Tensor | None) -> None:
        self.task, self.weights = task, weights

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("prefix"))
        weights = None if self.weights is None else self.weights.to(logits.device)
        return classification_loss(logits, batch["labels"], self.task, weights)


def train_stage(
    model: ClinicalModel,
    stage: Stage,
    data: ClassificationSet | LMBlocks,
    task: str,
    pad_id: int,
    run_dir: Path | None = None,
    resume: bool = False,
    seed: int = 0,
    val_data: ClassificationSet | None = None,
    progress: bool = True,
) -> TrainResult:
    """Add the stage's adapter, choose what trains and run the core training loop.

    Returns:
        The core ``TrainResult`` (its history holds the stage's metrics.jsonl rows).
    """
    if stage.adapter is not None and stage.name not in adapter_names(model.lm):
        add_adapter(model.lm, stage.adapter, name=stage.name)
    unknown = [n for n in stage.trainable if n not in adapter_names(model.lm)]
    if unknown:
        raise StageError(
            f"stage '{stage.name}' trains adapter(s) {unknown} that the model does not have "
            f"(it has {adapter_names(model.lm)}); add them in an earlier stage"
        )
    set_trainable(model.lm, list(stage.trainable))
    check_cached_layers(model)  # after set_trainable: it sees what this stage really trains
    head = stage.objective == "classification"
    model.classifier.requires_grad_(head)
    if not any(p.requires_grad for p in model.parameters()):
        raise StageError(
            f"stage '{stage.name}' has nothing to train; give it an adapter or trainable adapters"
        )
    if len(data) == 0:
        raise StageError(f"stage '{stage.name}' has no training data; lower max_length or add notes")
    if head:
        weights = None
        if stage.options.class_weights:
            labels = data.labels.numpy()
            weights = torch.tensor(class_weights(labels, task), dtype=torch.float32)
        loss_fn: Any = _ClassificationLoss(task, weights)
    else:
        loss_fn, val_data = _lm_loss, None
    return train(
        model,
        data,
        loss_fn,
        config=stage.train,
        val_data=val_data if stage.train.early_stopping_patience or stage.train.eval_every else None,
        run_dir=run_dir,
        resume=resume,
        collate_fn=PadCollate(pad_id),
        seed=seed,
        progress=progress,
    )


def score(model: ClinicalModel, data: ClassificationSet, task: str, pad_id: int, batch_size: int = 16):
    """Return ``(y_true, y_score)`` of the model on a classification set."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=PadCollate(pad_id))
    return predict_scores(model, loader, task)


def perplexity_of(model: ClinicalModel, data: LMBlocks, batch_size: int, bootstrap: int, seed: int) -> dict:
    """Return held-out perplexity with its bootstrap interval (see :func:`held_out_perplexity`)."""
    return held_out_perplexity(model, data.blocks, batch_size, bootstrap, seed, prefix=data.prefix)


def save_adapters(model: ClinicalModel, directory: Path, head_info: dict[str, Any]) -> dict[str, int]:
    """Save every adapter of ``model.lm`` (native, plus HF peft format for LoRA) and the head.

    Layout: ``<directory>/<adapter>/`` (native), ``<directory>/<adapter>/peft/`` (HF peft, loads with
    ``peft.PeftModel.from_pretrained(base_lm, path)``), ``<directory>/classifier/`` (head + head.json).

    Returns:
        Bytes on disk per saved folder (``<adapter>``, ``<adapter>/peft``, ``classifier``).
    """
    sizes: dict[str, int] = {}
    for name, spec in adapter_specs(model.lm).items():
        target = save_adapter(model.lm, Path(directory) / name, name=name)
        sizes[name] = (target / "adapter_model.safetensors").stat().st_size
        if isinstance(spec, LoRA):
            peft_dir = save_adapter(model.lm, Path(directory) / name / "peft", name=name, format="peft")
            sizes[f"{name}/peft"] = (peft_dir / "adapter_model.safetensors").stat().st_size
    head_dir = Path(directory) / HEAD_DIR
    head_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.classifier.state_dict().items()}
    save_file(state, str(head_dir / "classifier.safetensors"), metadata={"format": "pt"})
    info = {"pooling": model.pooling, "outputs": model.classifier.out_features, **head_info}
    (head_dir / "head.json").write_text(json.dumps(info, indent=2))
    sizes[HEAD_DIR] = (head_dir / "classifier.safetensors").stat().st_size
    return sizes


def load_adapters(model: ClinicalModel, directory: Path, names: list[str]) -> None:
    """Load saved adapters (in the order given: the order they compose) and the head into ``model``."""
    for name in names:
        load_adapter(model.lm, Path(directory) / name, name=name)
    head = Path(directory) / HEAD_DIR / "classifier.safetensors"
    if not head.is_file():
        raise FileNotFoundError(f"{head} is missing; the adapters folder has no classification head")
    model.classifier.load_state_dict(load_file(str(head)), strict=True)
    model.pooling = json.loads((head.parent / "head.json").read_text())["pooling"]


def describe_notes(notes: Notes, splits: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counts of a dataset for the report: splits, classes per split, drops; no text."""
    return {
        "splits": {name: int(len(idx)) for name, idx in splits.items()},
        "classes": {name: notes.subset(idx).class_counts() for name, idx in splits.items()},
        "counts": dict(notes.counts),
    }
