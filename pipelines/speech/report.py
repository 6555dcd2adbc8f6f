"""What the speech reports show beside the models' scores: the reference rows, checks, mels and WAVs.

Their prose is in :mod:`pipelines.speech.notes`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipelines.core.evaluation import EvaluationReport
from pipelines.core.peft import disable_adapters
from pipelines.speech.audio import load_wav
from pipelines.speech.data import Example, collate_examples, peak_normalize
from pipelines.speech.plots import plot_mels
from pipelines.speech.scoring import (
    Synthesis,
    evaluate_scores,
    score_recordings,
    score_waveforms,
    write_samples,
)

__all__ = [
    "adapter_facts", "REFERENCE_MODELS", "probe_mels", "disabled_equals_base", "score_second_takes",
    "reference_syntheses", "reference_results", "write_media", "write_base_media",
]  # fmt: skip

REFERENCE_MODELS = ("vocoded_recording", "second_take")


def score_second_takes(examples, takes, evaluators, num_bins: int | None) -> Synthesis:
    """Score another real take of each example's text (the ``second_take`` reference row)."""
    waveforms, rates = [], []
    for take in takes:
        wav, rate = load_wav(take.utterance.path)
        waveforms.append(peak_normalize(wav))
        rates.append(rate)
    return score_waveforms(
        [e.utterance for e in examples],
        waveforms,
        rates,
        [e.mel for e in examples],
        [t.mel for t in takes],
        num_bins,
        evaluators,
    )


def reference_syntheses(
    data, examples: list[Example], takes, synthesize: Callable[..., Synthesis], evaluators, num_bins
) -> dict[str, Synthesis]:
    """The reference rows (``extra.reference_models``) of ``data`` (AdaptationDataOptions), in the order of
    :data:`REFERENCE_MODELS`: the recordings vocoded (``synthesize(None, vocode_reference=True)``) and
    another real take of each test text (``takes``, None: no such row)."""
    out = {}
    if data.vocode_reference:
        out["vocoded_recording"] = synthesize(None, vocode_reference=True)
    if takes is not None:
        out["second_take"] = score_second_takes(examples, takes, evaluators, num_bins)
    return {label: out[label] for label in REFERENCE_MODELS if label in out}


def reference_results(
    references: dict[str, Synthesis], examples: list[Example], evaluators, bootstrap: int, seed: int, metrics
) -> dict[str, EvaluationReport]:
    """The reference rows' results: each of ``references`` on ``metrics`` and, when intelligibility is
    scored and some test clip has a digit, ``recording`` (the recordings themselves, intelligibility only)."""
    results = {label: evaluate_scores(s, bootstrap, seed, metrics) for label, s in references.items()}
    digits = any(e.utterance.digit is not None for e in examples)
    if evaluators is not None and "intelligibility" in metrics and digits:
        results["recording"] = evaluate_scores(
            score_recordings(examples, evaluators), bootstrap, seed, ["intelligibility"]
        )
    return results


@torch.no_grad()
def probe_mels(model: torch.nn.Module, examples: list[Example]) -> torch.Tensor:
    """Mels of up to four examples in one batch, durations predicted (the reload and disable checks)."""
    batch = collate_examples(examples[:4])
    model.eval()
    return model(batch["tokens"], batch["token_lengths"], batch["speakers"])["mels"]


def disabled_equals_base(
    base: torch.nn.Module, adapted: torch.nn.Module, probe: Callable[[torch.nn.Module], torch.Tensor]
) -> bool:
    """Whether ``adapted`` with its adapters disabled gives the base's ``probe(model)`` output bit for bit."""
    reference = probe(base)
    with disable_adapters(adapted):
        return bool(torch.equal(probe(adapted), reference))


def write_media(
    run_dir: Path,
    examples: list[Example],
    syntheses: dict[str, Synthesis],
    plot_clips: int,
    samples: int,
    sample_rate: int,
) -> list[str]:
    """``mels.png`` (the first ``plot_clips`` recordings against each synthesis) and ``samples/`` (the
    first ``samples`` clips of each model, real takes left out); returns the WAV names."""
    shown = min(plot_clips, len(examples))
    if shown:
        plot_mels(
            run_dir / "mels.png", [e.mel for e in examples[:shown]],
            {label: s.mels[:shown] for label, s in syntheses.items()},
            [e.utterance.path.stem for e in examples[:shown]],
        )  # fmt: skip
    names = []
    for label, synthesis in syntheses.items():
        if label != "second_take":  # real recordings already, at their own rate
            names += write_samples(run_dir / "samples", label, synthesis, examples, samples, sample_rate)
    return names


def write_base_media(
    run_dir: Path, label: str, examples: list[Example], synthesis: Synthesis, samples: int, sample_rate: int
) -> list[str]:
    """The base recipe's ``mels.png`` (three test clips spread over ``examples``: recording against
    synthesis) and ``samples/`` (its first ``samples`` clips); returns the WAV names."""
    shown = list(range(0, len(examples), max(1, len(examples) // 3)))[:3]
    mels = {label: [synthesis.mels[i] for i in shown]}
    titles = [examples[i].utterance.path.stem for i in shown]
    plot_mels(run_dir / "mels.png", [examples[i].mel for i in shown], mels, titles)
    return write_samples(run_dir / "samples", label, synthesis, examples, samples, sample_rate)


def adapter_facts(folder: Path, primary) -> dict:
    """What the report's ``adapter`` entry adds to the engine's (method, spec, directory, file size): the
    primary model's adapter file in ``folder`` and its trainable parameters."""
    return {
        "file": str(folder / "adapter_model.safetensors"),
        "trainable_parameters": primary.parameters["trainable"],
    }
