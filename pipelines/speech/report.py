"""What the speech reports say beside the scores: metric notes, the reference rows, checks, mels and WAVs."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.core.evaluation import EvaluationReport
from pipelines.core.peft import disable_adapters, spec_to_dict
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
    "adapter_facts",
    "METRIC_NOTES", "REFERENCE_MODELS", "probe_mels", "disabled_equals_base", "score_second_takes",
    "reference_notes", "reference_results", "write_media",
]  # fmt: skip

METRIC_NOTES = [
    "mcd: mel-cepstral distortion in dB as TTS papers compute it. The synthesis (22,050 Hz from the "
    "vocoder) is resampled to the recording's own rate (8 kHz for FSDD); both go through WORLD (harvest "
    "F0, CheapTrick envelope, 5 ms frames) and pysptk.sp2mc (mel-cepstrum of order 24, all-pass constant "
    "0.312 at 8 kHz); c1-c24 (c0, the level, dropped) are DTW-aligned and "
    "MCD = 10/ln10*sqrt(2*sum_d (c_d - c'_d)^2), averaged over the aligned frames.",
    "log_f0_rmse (cents), gpe, vde, f0_coverage: WORLD harvest F0 (71-800 Hz) of both waveforms on the "
    "MCD's frames and DTW path. log-F0 RMSE and gpe (gross pitch error: F0 off by more than 20%) are over "
    "the aligned frames voiced in both; vde (voicing decision error) is the share of aligned frames whose "
    "voiced/unvoiced decisions differ; f0_coverage the share voiced in both.",
    "log_mel_cepstral_distance: dB, RMS over the log-mel bins below 4 kHz of the level-free log-mel "
    "difference kept to c1-c24 of the orthonormal DCT (20/ln10*|dc|/sqrt(bins)), DTW-aligned on the "
    "11.6 ms HiFi-GAN frames; a second view on the mel filterbank, not the MCD of papers.",
    "speaker_similarity: cosine between embeddings of a speaker-ID model (2 convolutions, statistics "
    "pooling, 64-d embedding) trained on the FSDD training split of the base speakers only (it has never "
    "heard the target speaker); synthesis against the recording with the same text.",
    "intelligibility: accuracy of a digit classifier (same architecture) trained on real FSDD training "
    "audio of all 6 speakers (the target's training clips included: it judges words, not voices), applied "
    "to the synthesised audio. All intervals: 95% bootstrap over test utterances; each metric's mean is "
    "over the utterances it could score (counts below).",
    "Durations: no aligner offline; each clip's voiced span (frames within 35 dB of its loudest) is split "
    "uniformly over the characters, leading/trailing frames go to silence tokens.",
]
REFERENCE_MODELS = ("vocoded_recording", "second_take")
RECORDING_NOTE = (
    "recording scores the real test recordings themselves with the digit classifier, the intelligibility "
    "a synthesis is read against (that metric only: any other would compare a recording with itself)"
)


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


def reference_notes(data, takes, test_examples, recording: bool = False) -> list[str]:
    """What the reference rows are (``data``: AdaptationDataOptions; ``recording``: the row of
    :func:`reference_results` is there), and which takes second_take used."""
    rows = []
    if data.vocode_reference:
        rows.append(
            "vocoded_recording scores the recordings' own mels through the vocoder, the floor any synthesis "
            "through this vocoder can reach"
        )
    if takes is not None:
        rows.append(
            "second_take scores another real take of the same text by the same speaker against each test "
            "recording: what natural variation alone gives (its speaker_similarity, real against real, is "
            "the ceiling of that metric)"
        )
    if recording:
        rows.append(RECORDING_NOTE)
    notes = (
        ["Reference rows, not competitors (report.json extra.reference_models): " + "; ".join(rows) + "."]
        if rows
        else []
    )
    if takes is not None and all(t.utterance.index is not None for t in [*takes, *test_examples]):
        indices = sorted({t.utterance.index for t in takes})
        scored = sorted({e.utterance.index for e in test_examples})
        unseen = all(i < 5 for i in indices)  # FSDD test split: no evaluator trained on them
        notes.append(
            f"second_take uses the takes with FSDD indices {indices} "
            + ("(test split, " if unseen else "(")
            + f"never used for adaptation in this run) for the scored test clips with indices {scored}, "
            "same digit (extra.second_takes lists each pair)"
            + ("; no evaluator was trained on them." if unseen else ".")
        )
    elif takes is not None:
        notes.append(
            "second_take uses other takes of the test texts in the speaker's folders, never used for "
            "adaptation in this run (extra.second_takes lists each pair)."
        )
    elif data.second_take_reference:
        notes.append("No second_take row: some test text has no take left that is neither scored nor used.")
    return notes


@torch.no_grad()
def probe_mels(model: torch.nn.Module, examples: list[Example]) -> torch.Tensor:
    """Mels of up to four examples in one batch, durations predicted (the reload and disable checks)."""
    batch = collate_examples(examples[:4])
    model.eval()
    return model(batch["tokens"], batch["token_lengths"], batch["speakers"])["mels"]


def disabled_equals_base(base: torch.nn.Module, adapted: torch.nn.Module, examples: list[Example]) -> bool:
    """Whether the adapted model with its adapters disabled gives the base's mels bit for bit."""
    reference = probe_mels(base, examples)
    with disable_adapters(adapted):
        return bool(torch.equal(probe_mels(adapted, examples), reference))


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


def adapter_facts(stage, primary) -> dict:
    """The report's ``adapter`` entry: the last stage's method and spec, its saved file and size."""
    folder = primary.adapters[stage.name]
    return {
        "method": stage.adapter.method,
        "spec": spec_to_dict(stage.adapter),
        "file": str(folder / "adapter_model.safetensors"),
        "file_size_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "trainable_parameters": primary.parameters["trainable"],
    }
