"""New-speaker adaptation of a frozen acoustic model: methods, clip choice, nearest speaker, training.

Methods (one label each in reports):
- the stage's adapter (default a serial bottleneck adapter on every ``proj`` of the encoder, duration
  predictor and decoder): only the adapter trains; disabling it gives the base back exactly;
- ``lora``: LoRA on the same projections, same steps and learning rate;
- ``full_finetune``: every weight of a copy of the base trains (a lower learning rate, ``finetune_lr``);
- ``nearest_speaker``: no training, the base model speaking as the closest existing speaker.
All conditioned on the nearest existing speaker's embedding, so only the adapted weights carry the
new voice.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.core.peft import (
    AdapterSpec,
    LoRA,
    ParameterCount,
    add_adapter,
    count_parameters,
    set_trainable,
)
from pipelines.core.training import TrainConfig, TrainResult, train
from pipelines.speech.backbones import _Examples, acoustic_loss
from pipelines.speech.data import Example, Utterance, collate_examples
from pipelines.speech.model import AcousticModel, adapter_targets

__all__ = ["AdaptedModel", "adaptation_clips", "second_takes", "nearest_speaker", "adapt", "BASELINES"]

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


def _with_speaker(examples: list[Example], speaker: int) -> list[Example]:
    return [Example(e.tokens, e.durations, e.mel, speaker, e.utterance) for e in examples]


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
    ``full_finetune`` or ``nearest_speaker``); the base itself is never changed.

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
        run_dir: Where the loop writes metrics.jsonl (and checkpoints).
    """
    from pipelines.core.peft import Bottleneck

    model = copy.deepcopy(base)
    start = time.perf_counter()
    if method == "nearest_speaker":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return AdaptedModel(method, model.eval(), None, count_parameters(model), 0.0)
    if method == "adapter":
        add_adapter(model, spec or Bottleneck(targets=adapter_targets(), hidden=16), name=name)
        set_trainable(model, [name])
    elif method == "lora":
        add_adapter(model, LoRA(r=lora_rank, alpha=2 * lora_rank, targets=adapter_targets()), name=name)
        set_trainable(model, [name])
    elif method == "full_finetune":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        config = config.model_copy(update={"lr": finetune_lr})
    else:
        raise ValueError(f"unknown adaptation method '{method}'; use adapter, {', '.join(BASELINES)}")
    parameters = count_parameters(model)
    # a few clips with batch 8 would make a DataLoader with fewer batches than steps: repeat the clips
    data = _with_speaker(examples, speaker)
    repeats = max(1, int(np.ceil(config.batch_size / max(len(data), 1))))
    result = train(
        model,
        _Examples(data * repeats),
        loss_fn=acoustic_loss,
        config=config,
        run_dir=run_dir,
        collate_fn=collate_examples,
        seed=seed,
        progress=False,
    )
    model.eval()
    return AdaptedModel(method, model, result, parameters, time.perf_counter() - start)
