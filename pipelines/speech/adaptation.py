"""New-speaker adaptation of a frozen acoustic model: methods, clip choice, nearest speaker, training hooks.

Methods (one label each in reports):
- the stage's adapter (default a serial bottleneck adapter on every ``proj`` of the encoder, duration
  predictor and decoder): only the adapter trains; disabling it gives the base back exactly;
- ``lora``: LoRA on the same projections, same steps and learning rate;
- ``full_finetune``: every weight of a copy of the base trains (a lower learning rate, ``finetune_lr``);
- ``nearest_speaker``: no training, the base model speaking as the closest existing speaker.
All conditioned on the nearest existing speaker's embedding, so only the adapted weights carry the
new voice. Every trained method goes through the core engine's ``train_candidate`` with
:class:`ClipTraining` as its hooks: lab code, the recipe path and the clip sweep train the same way.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.core.experiment import StagePlan, train_candidate
from pipelines.core.peft import AdapterSpec, Bottleneck, LoRA, ParameterCount, count_parameters
from pipelines.core.recipe import BackboneSection, DataSection, Recipe, StageSection
from pipelines.core.training import TrainConfig, TrainResult
from pipelines.speech.backbones import _Examples, acoustic_loss
from pipelines.speech.data import Example, Utterance, collate_examples
from pipelines.speech.model import AcousticModel, adapter_targets

__all__ = [
    "AdaptedModel",
    "ClipTraining",
    "adaptation_clips",
    "second_takes",
    "nearest_speaker",
    "speaking_as",
    "baseline_stage",
    "adaptation_recipe",
    "adapt",
    "BASELINES",
]

BASELINES = ("lora", "full_finetune", "nearest_speaker")


@dataclass
class AdaptedModel:
    """A model after one method, with its training result and parameter count."""

    label: str
    model: AcousticModel
    result: TrainResult | None
    parameters: ParameterCount
    wall_time_s: float


def adaptation_clips(utterances: list[Utterance], count: int | str) -> list[Utterance]:
    """The first ``count`` clips in digit round-robin order (digit 0 index 5, digit 1 index 5, ...).

    Balanced over digits and deterministic; ``"all"`` keeps every clip.
    """
    ordered = sorted(
        utterances, key=lambda u: ((u.index or 0), (u.digit if u.digit is not None else 0), u.path.name)
    )
    if count == "all":
        return ordered
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"adaptation_clips must be a positive number or 'all', not {count!r}")
    if count > len(ordered):
        raise ValueError(f"adaptation_clips is {count} but the target speaker has only {len(ordered)} clips")
    return ordered[:count]


def second_takes(test: list[Utterance], clips: list[Utterance], used: set[Path]) -> list[Utterance] | None:
    """For each test clip, another take of the same text by the same speaker that is neither scored nor
    in ``used`` (the adaptation clips): the k-th scored clip of a text gets the k-th unused take of it,
    by clip index. None when some text has too few unused takes.
    """
    scored = {u.path for u in test}
    unused: dict[tuple[str, str], list[Utterance]] = {}
    for u in sorted(clips, key=lambda u: ((u.index or 0), u.path.name)):
        if u.path not in scored and u.path not in used:
            unused.setdefault((u.speaker, u.text), []).append(u)
    taken: dict[tuple[str, str], int] = {}
    out = []
    for u in test:
        key = (u.speaker, u.text)
        k = taken.get(key, 0)
        if k >= len(unused.get(key, [])):
            return None
        out.append(unused[key][k])
        taken[key] = k + 1
    return out


@torch.no_grad()
def nearest_speaker(
    evaluators, target: list[Example], candidates: dict[int, list[Example]]
) -> tuple[int, dict]:
    """The candidate speaker id whose mean speaker-ID embedding is closest (cosine) to the target's.

    Returns:
        (speaker id, {speaker id: cosine}).
    """

    def centroid(examples: list[Example]) -> torch.Tensor:
        embeddings = evaluators.speaker_embeddings([e.mel for e in examples])
        return torch.nn.functional.normalize(embeddings, dim=1).mean(dim=0)

    goal = centroid(target)
    cosines = {
        speaker: float(torch.nn.functional.cosine_similarity(goal, centroid(examples), dim=0))
        for speaker, examples in candidates.items()
    }
    return max(cosines, key=cosines.get), cosines


def speaking_as(evaluators, target: list[Example], candidates: Any) -> tuple[int, dict]:
    """The base speaker every model speaks as: the :func:`nearest_speaker` to the target's clips among
    ``candidates()``, or speaker 0 (cosine NaN) without evaluators."""
    if evaluators is None:
        return 0, {0: math.nan}
    return nearest_speaker(evaluators, target, candidates())


def default_adapter() -> Bottleneck:
    """The default speaker adapter: a bottleneck of hidden size 16 on every ``proj``."""
    return Bottleneck(targets=adapter_targets(), hidden=16)


def baseline_stage(name: str, stage: Any, lora_rank: int, finetune_lr: float, targets: list[str]) -> Any:
    """A trained baseline as one stage with ``stage``'s objective and budget: ``lora`` (rank
    ``lora_rank``, alpha 2 x rank, on ``targets``) or ``full_finetune`` (no adapter, which the speech
    hooks read as every weight training, at ``finetune_lr``)."""
    if name == "lora":
        spec = LoRA(r=lora_rank, alpha=2 * lora_rank, targets=list(targets))
        return stage.model_copy(update={"name": name, "adapter": spec, "trainable": [name]})
    if name == "full_finetune":
        train = stage.train.model_copy(update={"lr": finetune_lr})
        return stage.model_copy(update={"name": name, "adapter": None, "trainable": [], "train": train})
    raise ValueError(f"unknown adaptation baseline '{name}'; use {', '.join(BASELINES)}")


def adaptation_recipe(
    recipe: Recipe | None, stage: StageSection, compare: list, seed: int, backbone: str
) -> Recipe:
    """The recipe the engine runs: ``recipe`` with its one stage's adapter set to ``stage.adapter`` (an
    ``adapter: null`` stage trains the default one) and ``compare`` as the pipeline reads it; for lab
    code's ``run``, a recipe made of ``stage`` and these."""
    if recipe is not None:
        first = recipe.stages[0]
        first = first.model_copy(
            update={"adapter": stage.adapter, "trainable": first.trainable or [first.name]}
        )
        return recipe.model_copy(update={"stages": [first], "compare": list(compare)})
    return Recipe(
        name="speaker_adaptation", pipeline="speech/speaker_adaptation", seed=seed,
        backbone=BackboneSection(name=backbone), data=DataSection(dataset="fsdd"), stages=[stage],
        compare=list(compare),
    )  # fmt: skip


def _with_speaker(examples: list[Example], speaker: int) -> list[Example]:
    return [Example(e.tokens, e.durations, e.mel, speaker, e.utterance) for e in examples]


class ClipTraining:
    """The engine's training hooks on a speaker's clips, conditioned on one existing speaker.

    Each candidate is a copy of the frozen base; its adapter starts from ``seed`` whatever trained
    before it. A stage's adapter without targets goes on every ``proj``; a stage without an adapter is
    full fine-tuning (the acoustic model has no head to train alone).
    """

    def __init__(
        self, base: AcousticModel, examples: list[Example], speaker: int, seed: int, checkpoint: bool = True
    ) -> None:
        self.base, self.examples = base, _with_speaker(examples, speaker)
        self.seed, self.checkpoint = seed, checkpoint

    def new_model(self) -> AcousticModel:
        torch.manual_seed(self.seed)
        return copy.deepcopy(self.base)

    def plan_stage(self, model: AcousticModel, stage: Any, index: int) -> StagePlan:
        spec = stage.adapter
        if spec is not None and not spec.targets:
            spec = replace(spec, targets=adapter_targets())
        # a few clips with batch 8 would make a DataLoader with fewer batches than steps: repeat the clips
        repeats = max(1, int(np.ceil(stage.train.batch_size / max(len(self.examples), 1))))
        return StagePlan(
            _Examples(self.examples * repeats), acoustic_loss, spec, full=spec is None,
            collate_fn=collate_examples, checkpoint=self.checkpoint,
        )  # fmt: skip

    def predict(self, model: AcousticModel) -> tuple[np.ndarray, np.ndarray]:
        """Lab code has no test split here: empty arrays."""
        return np.empty(0), np.empty(0)


def adapt(
    base: AcousticModel,
    method: str,
    examples: list[Example],
    speaker: int,
    config: TrainConfig,
    spec: AdapterSpec | None = None,
    name: str = "speaker",
    finetune_lr: float = 3e-4,
    lora_rank: int = 4,
    seed: int = 0,
    run_dir=None,
) -> AdaptedModel:
    """Adapt a copy of ``base`` to the examples with one method (``adapter``, ``lora``,
    ``full_finetune`` or ``nearest_speaker``) through ``train_candidate``; the base never changes.

    Args:
        base: The frozen base model.
        method: Which method.
        examples: The new speaker's clips.
        speaker: The existing speaker id the model is conditioned on.
        config: Training settings (steps, batch, lr) shared by every method.
        spec: The adapter for ``adapter`` (default: bottleneck, hidden 16, on every proj).
        name: Adapter name.
        finetune_lr: Learning rate of ``full_finetune``.
        lora_rank: Rank of ``lora`` (alpha = 2 x rank).
        seed: Training seed.
        run_dir: Where the loop writes ``train/<method>/<stage>/`` (metrics.jsonl, checkpoints).
    """
    start = time.perf_counter()
    if method == "nearest_speaker":
        model = copy.deepcopy(base).requires_grad_(False).eval()
        return AdaptedModel(method, model, None, count_parameters(model), 0.0)
    stage = StageSection(name=name, objective="tts", adapter=spec or default_adapter(), train=config)
    if method != "adapter":
        stage = baseline_stage(method, stage, lora_rank, finetune_lr, adapter_targets())
    hooks = ClipTraining(base, examples, speaker, seed, checkpoint=run_dir is not None)
    trained = train_candidate(hooks, [stage], method, Path(run_dir or "."), False, seed, False)
    model = trained.model.eval()
    return AdaptedModel(
        method, model, trained.results[0], count_parameters(model), time.perf_counter() - start
    )
