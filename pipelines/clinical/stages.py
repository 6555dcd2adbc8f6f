"""The mechanics shared by the recipe path and lab code: build the model, turn notes into tensors, place
a stage's adapter in the causal LM, the two losses, the cached-layer check, the baselines' stages, score,
save and load."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from pipelines.clinical.backbones import Backbone
from pipelines.clinical.data import Notes
from pipelines.clinical.metrics import held_out_perplexity
from pipelines.clinical.model import ClinicalModel, classification_loss, num_outputs, predict_scores
from pipelines.clinical.options import StageOptions
from pipelines.clinical.tokens import ClassificationSet, LMBlocks, PadCollate, encode_notes, pack_blocks
from pipelines.core.experiment.engine import compare_stages
from pipelines.core.peft import (
    AdaptedLayer,
    LoRA,
    PrefixTuning,
    PTuning,
    adapter_names,
    adapter_specs,
    add_adapter,
    load_adapter,
    save_adapter,
    wrappers,
)
from pipelines.core.peft.inject import logical_modules, matches
from pipelines.core.recipe import StageSection
from pipelines.core.training import TrainConfig

__all__ = [
    "HEAD",
    "PROMPT_CACHE_REASON",
    "PROMPT_METHODS",
    "Stage",
    "StageError",
    "as_section",
    "stage_options",
    "lm_copy",
    "build_model",
    "classification_data",
    "lm_data",
    "lm_adapter",
    "check_cached_layers",
    "adapted_lm_modules",
    "stage_adapter",
    "check_compare_specs",
    "baseline_stages",
    "lm_loss",
    "ClassificationLoss",
    "score",
    "perplexity_of",
    "save_adapters",
    "save_exports",
    "export_run_adapters",
    "load_adapters",
]

HEAD = "classifier"  # the head's module name in ClinicalModel and its folder next to the adapters
WEIGHTS = "adapter_model.safetensors"
# Methods whose adapter changes what every decoder layer reads, so no layer's output can be cached.
PROMPT_METHODS = ("prefix", "ptuning")
PROMPT_CACHE_REASON = (
    "{method} changes what every decoder layer reads (prefix tuning: each attention layer's keys and values; "
    "P-tuning: prompt tokens before the note), so no layer's output can be cached; set "
    "backbone.options.cached_layers: 0 (it is {cached})"
)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class StageError(ValueError):
    """A stage cannot run as configured."""


@dataclass
class Stage:
    """One training stage for lab code (see :func:`as_section`): the adapter it adds (or none), what
    trains, the loop settings and its options."""

    name: str
    objective: Literal["causal_lm", "classification"]
    adapter: Any = None
    trainable: list[str] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: StageOptions = field(default_factory=StageOptions)


def as_section(stage: Stage | StageSection) -> StageSection:
    """The stage as the recipe's ``StageSection``, which the experiment engine trains."""
    if isinstance(stage, StageSection):
        return stage
    return StageSection(
        name=stage.name, objective=stage.objective, adapter=stage.adapter, trainable=list(stage.trainable),
        train=stage.train, options=stage_options(stage).model_dump(),
    )  # fmt: skip


def stage_options(stage: Any) -> StageOptions:
    """The stage's options validated as ``StageOptions``."""
    options = stage.options
    return options if isinstance(options, StageOptions) else StageOptions.model_validate(dict(options or {}))


def lm_copy(lm: Any) -> Any:
    """A copy of a causal LM that shares its weights: adapters added to the copy never reach ``lm``."""
    shared = {id(tensor): tensor for tensor in (*lm.parameters(), *lm.buffers())}
    return copy.deepcopy(lm, memo=shared)


def build_model(
    backbone: Backbone, task: str, num_classes: int, pooling: str, cached_layers: int = 0, seed: int = 0
) -> ClinicalModel:
    """Return a copy of the backbone's LM (frozen weights shared) with a freshly (seeded) initialised head."""
    layers = int(backbone.model.config.num_hidden_layers)
    if cached_layers >= layers:
        raise StageError(
            f"backbone.options.cached_layers is {cached_layers} but the backbone has {layers} layers; "
            f"use at most {layers - 1} so the adapters have layers to live in"
        )
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    model = ClinicalModel(lm_copy(backbone.model), num_outputs(task, num_classes), pooling=pooling, seed=seed)
    model.cached_layers = cached_layers
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
    # Tokenise only as many notes as the blocks need (plus one for the cut), a few at a time.
    token_lists: list[list[int]] = []
    total = 0
    for start in range(0, len(texts), 32):
        part = encode_notes(tokenizer, texts[start : start + 32])
        token_lists += part
        total += sum(len(t) + 1 for t in part)
        if max_blocks is not None and total >= (max_blocks + 1) * block_length:
            break
    blocks = pack_blocks(token_lists, block_length, int(tokenizer.eos_token_id), max_blocks=max_blocks)
    prefix = LMBlocks.prefix_of(model, blocks, batch_size) if model.cached_layers and len(blocks) else None
    return LMBlocks(blocks, prefix)


def lm_adapter(model: ClinicalModel, spec: Any, stage: str) -> Any:
    """The stage's adapter with its targets (module names of the LM) resolved to the modules they select,
    written as paths of ``model`` (``lm.<path>``): the adapter lives in the LM, never on the head. Refuses
    prefix tuning and P-tuning on a model with cached layers."""
    if spec is None:
        return None
    if spec.method in PROMPT_METHODS and model.cached_layers:
        raise StageError(
            f"stage '{stage}': " + PROMPT_CACHE_REASON.format(method=spec.method, cached=model.cached_layers)
        )
    if not spec.targets:
        raise StageError(f"stage '{stage}': give adapter.targets (LM module names, e.g. [q_proj, v_proj])")
    modules = list(logical_modules(model.lm))
    for target in spec.targets:
        if not any(matches(target, item.name, item.module) for item in modules):
            leaves = sorted({item.name.rsplit(".", 1)[-1] for item in modules})
            raise StageError(
                f"stage '{stage}': adapter target '{target}' matches no module of the LM; its module "
                f"names end in {', '.join(leaves[:12])}, ..."
            )
    chosen = [item.name for item in modules if any(matches(t, item.name, item.module) for t in spec.targets)]
    return replace(spec, targets=[f"lm.{name}" for name in chosen])


def check_cached_layers(model: ClinicalModel, adding: Sequence[str] = ()) -> None:
    """Raise when an adapter (present, or about to go on the LM modules ``adding``) or a trainable
    parameter feeds the cached prefix states (they would go stale).

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
        adapted = isinstance(module, AdaptedLayer) or name in adding
        if not (adapted or trainable):
            continue
        match = _LAYER.search(name + ".")
        where = f"sits in layer {match.group(1)}" if match else "sits before the decoder layers"
        what = f"adapter on '{name}'" if adapted else f"trainable parameter '{name}.{trainable[0]}'"
        raise StageError(
            f"{what} {where}, below backbone.options.cached_layers = {cached}, so the cached states "
            f"would go stale; adapt or train only layers >= {cached} (e.g. with a 're:' target) or lower "
            "cached_layers (0 turns the cache off)"
        )


def adapted_lm_modules(spec: Any) -> list[str]:
    """The LM modules a resolved adapter (see :func:`lm_adapter`) goes on; none without an adapter."""
    return [] if spec is None else [target.removeprefix("lm.") for target in spec.targets]


def stage_adapter(model: ClinicalModel, stage: StageSection) -> Any:
    """The stage's adapter resolved for ``model`` (see :func:`lm_adapter`; None: the stage adds none).
    Refuses, before anything changes, a stage that trains a missing adapter or puts an adapter below the
    cached layers."""
    spec = lm_adapter(model, stage.adapter, stage.name)
    known = adapter_names(model) + ([stage.name] if spec is not None else [])
    unknown = [n for n in stage.trainable or [] if n not in known]
    if unknown:
        raise StageError(
            f"stage '{stage.name}' trains adapter(s) {unknown} that the model does not have "
            f"(it has {adapter_names(model)}); add them in an earlier stage"
        )
    # set_trainable (next, in the engine) trains only adapters and the head, so checking the adapters
    # already there and the modules about to get one covers everything the stage will train.
    check_cached_layers(model, adapted_lm_modules(spec))
    return spec


def check_compare_specs(model: ClinicalModel, recipe: Any) -> None:
    """Refuse, before anything trains, a compare spec ``model`` cannot hold: a target that matches no LM
    module, or an adapter below the cached layers (the classification sets' cached states)."""
    for index, entry in enumerate(recipe.compare):
        if isinstance(entry, str):
            continue
        # The spec's stage trains only its own adapter and the head: only where the adapter goes can fail.
        try:
            stage_adapter(model, compare_stages(recipe, entry)[0])
        except StageError as error:
            raise StageError(f"compare.{index}: {error}") from None


def baseline_stages(stages: list[StageSection], name: str) -> list[StageSection]:
    """A named baseline's stages: ``head_only``, the frozen backbone and a head (the first classification
    stage without its adapter); ``single_stage_lora``, the classification stages alone (no domain
    adaptation), training only the adapters they add."""
    heads = [s for s in stages if s.objective == "classification"]
    if name == "head_only":
        return [heads[0].model_copy(update={"name": "head", "adapter": None, "trainable": []})]
    if name != "single_stage_lora":
        raise StageError(f"compare: unknown baseline '{name}'; use head_only or single_stage_lora")
    added: list[str] = []
    copies = []
    for stage in heads:
        if stage.adapter is not None:
            added.append(stage.name)
        copies.append(stage.model_copy(update={"trainable": [n for n in stage.trainable if n in added]}))
    if not added:
        raise StageError("compare: single_stage_lora needs a classification stage with an adapter")
    return copies


def _inner(model: Any) -> ClinicalModel:
    return getattr(model, "module", model)  # DDP / FSDP wrappers keep the model in .module


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of a batch of packed blocks (from cached prefix states when the batch has them)."""
    return _inner(model).lm_loss(batch["input_ids"], None, batch.get("prefix"))


class ClassificationLoss:
    """The task's classification loss of a batch, with optional class weights."""

    def __init__(self, task: str, weights: torch.Tensor | None) -> None:
        self.task, self.weights = task, weights

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("prefix"))
        weights = None if self.weights is None else self.weights.to(logits.device)
        return classification_loss(logits, batch["labels"], self.task, weights)


def score(model: ClinicalModel, data: Any, task: str, pad_id: int, batch_size: int = 16):
    """Return ``(y_true, y_score)`` of the model on a classification set."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=PadCollate(pad_id))
    return predict_scores(model, loader, task)


def perplexity_of(model: ClinicalModel, data: LMBlocks, batch_size: int, bootstrap: int, seed: int) -> dict:
    """Return held-out perplexity with its bootstrap interval (see :func:`held_out_perplexity`)."""
    return held_out_perplexity(model, data.blocks, batch_size, bootstrap, seed, prefix=data.prefix)


def save_adapters(
    model: ClinicalModel, bare_lm: Any, directory: Path, head_info: dict[str, Any], heads: Sequence[str] = ()
) -> dict[str, int]:
    """Save every adapter as a recipe run does: ``<adapter>/`` (native, the head inside for the adapters
    named in ``heads``), then :func:`save_exports`. Returns bytes on disk per saved folder."""
    sizes = {}
    for name in adapter_names(model):
        extra = [HEAD] if name in heads else None
        sizes[name] = (
            (save_adapter(model, Path(directory) / name, name, extra=extra) / WEIGHTS).stat().st_size
        )
    return {**sizes, **save_exports(model, bare_lm, directory, head_info)}


def save_exports(
    model: ClinicalModel, bare_lm: Any, directory: Path, head_info: dict[str, Any]
) -> dict[str, int]:
    """Write each LoRA, prefix-tuning and P-tuning adapter in HF peft's format against the bare LM, and the
    head on its own.

    ``<directory>/<adapter>/peft/`` loads with ``peft.PeftModel.from_pretrained(base_lm, path)``;
    ``<directory>/classifier/`` holds the head and head.json (pooling, task, class names, adapter order).
    ``bare_lm`` is a copy of the backbone's LM without adapters (see :func:`lm_copy`); it receives them.

    Returns:
        Bytes on disk per saved folder (``<adapter>/peft``, ``classifier``).
    """
    sizes: dict[str, int] = {}
    for name, spec in adapter_specs(model).items():
        if not isinstance(spec, (LoRA, PrefixTuning, PTuning)):
            continue
        trained = {p.removeprefix("lm."): w.adapters[name] for p, w in wrappers(model) if name in w.adapters}
        add_adapter(bare_lm, replace(spec, targets=[f"re:{re.escape(path)}" for path in trained]), name=name)
        for path, wrapper in wrappers(bare_lm):
            if name in wrapper.adapters:
                wrapper.adapters[name].load_state_dict(trained[path].state_dict())
        folder = save_adapter(bare_lm, Path(directory) / name / "peft", name=name, format="peft")
        sizes[f"{name}/peft"] = (folder / WEIGHTS).stat().st_size
    head_dir = Path(directory) / HEAD
    head_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.classifier.state_dict().items()}
    save_file(state, str(head_dir / "classifier.safetensors"), metadata={"format": "pt"})
    info = {"pooling": model.pooling, "outputs": model.classifier.out_features,
            "adapters": adapter_names(model), **head_info}  # fmt: skip
    (head_dir / "head.json").write_text(json.dumps(info, indent=2))
    sizes[HEAD] = (head_dir / "classifier.safetensors").stat().st_size
    return sizes


def export_run_adapters(
    model: ClinicalModel,
    saved: dict[str, Path],
    bare_lm: Any,
    directory: Path,
    head_info: dict[str, Any],
) -> dict[str, Any]:
    """Write a recipe run's HF peft copies and head (:func:`save_exports`) beside the native adapter
    folders the engine saved (``saved``: adapter name -> folder).

    Returns:
        What the report's ``adapter`` entry adds to the engine's: the order the adapters compose in and the
        bytes of every folder written (native adapters, HF peft copies, the head).
    """
    sizes = {name: (path / WEIGHTS).stat().st_size for name, path in saved.items()}
    sizes.update(save_exports(model, bare_lm, directory, head_info))
    return {"order": adapter_names(model), "files": sizes}


def load_adapters(model: ClinicalModel, directory: Path, names: list[str] | None = None) -> None:
    """Load saved adapters (native folders, in the order they compose; default: head.json's order) and
    the head into a fresh ``model``."""
    head = Path(directory) / HEAD / "classifier.safetensors"
    if not head.is_file():
        raise FileNotFoundError(f"{head} is missing; the adapters folder has no classification head")
    info = json.loads((head.parent / "head.json").read_text())
    for name in names if names is not None else info.get("adapters", []):
        load_adapter(model, Path(directory) / name, name=name)
    model.classifier.load_state_dict(load_file(str(head)), strict=True)
    model.pooling = info["pooling"]
