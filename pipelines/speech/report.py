"""Turn adapted models into a RunResult: scores, checks, mel plots, WAV samples, provenance."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from pipelines.core.evaluation import RunResult
from pipelines.core.peft import disable_adapters, load_adapter
from pipelines.speech.audio import AUDIO, load_wav
from pipelines.speech.data import FSDD_SHA256, collate_examples, peak_normalize
from pipelines.speech.scoring import (
    SPEECH_METRICS,
    Synthesis,
    evaluate_scores,
    merge_syntheses,
    plot_mels,
    score_waveforms,
    synthesize_and_score,
    unscored_notes,
    unscored_summary,
    write_samples,
)

__all__ = ["REFERENCE_MODELS", "adaptation_run", "base_run", "score_second_takes"]

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


def _metrics(pipe) -> list[str]:
    recipe = pipe.recipe
    return list(recipe.evaluation.metrics) if recipe and recipe.evaluation.metrics else list(SPEECH_METRICS)


def _bootstrap(pipe) -> int:
    return pipe.recipe.evaluation.bootstrap if pipe.recipe else 1000


def _headline(pipe) -> str:
    return (pipe.recipe.evaluation.headline if pipe.recipe else None) or _metrics(pipe)[0]


@torch.no_grad()
def _checks(base: torch.nn.Module, adapted: torch.nn.Module, name: str, folder: Path, examples) -> dict:
    """Disabling the adapter gives the base bit for bit; the saved adapter reloads to identical mels."""
    batch = collate_examples(examples[:4])
    inputs = (batch["tokens"], batch["token_lengths"], batch["speakers"])
    base.eval()
    adapted.eval()
    reference = base(*inputs)["mels"]
    with disable_adapters(adapted):
        disabled = adapted(*inputs)["mels"]
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, folder)
    reloaded.eval()
    return {
        "disabled_adapter_equals_base": bool(torch.equal(disabled, reference)),
        "reloaded_adapter_equals_trained": bool(
            torch.equal(reloaded(*inputs)["mels"], adapted(*inputs)["mels"])
        ),
    }


def adaptation_run(
    pipe,
    run_dir: Path,
    backbone,
    target: str,
    speaker: int,
    cosines: dict,
    adapted: dict,
    sweep: dict,
    train_examples,
    test_examples,
    evaluators,
    started: float,
    takes=None,
) -> RunResult:
    """Score every adapted model and the reference rows on the same test clips; assemble the result.

    ``takes``: for each test example another real take of its text by the target speaker (the
    ``second_take`` reference row), or None.
    """
    options = pipe.options
    vocoder = pipe.vocoder()
    metrics, bootstrap, seed = _metrics(pipe), _bootstrap(pipe), pipe.seed
    results, syntheses, parameters, histories = {}, {}, {}, {}
    base_total = sum(p.numel() for p in backbone.model.parameters())
    for label, item in adapted.items():
        synthesis = synthesize_and_score(
            item.model, test_examples, speaker, vocoder, evaluators, pipe.session.num_bins
        )
        syntheses[label] = synthesis
        results[label] = evaluate_scores(synthesis, bootstrap, seed, metrics)
        count = item.parameters
        parameters[label] = {
            "trainable": count.trainable,
            "total": count.total,
            "fraction": count.trainable / base_total,
        }
        if item.result is not None:
            histories[label] = item.result.history
    if options.data.vocode_reference:
        reference = synthesize_and_score(
            None, test_examples, speaker, vocoder, evaluators, pipe.session.num_bins, vocode_reference=True
        )
        syntheses["vocoded_recording"] = reference
        results["vocoded_recording"] = evaluate_scores(reference, bootstrap, seed, metrics)
    if takes is not None:
        syntheses["second_take"] = score_second_takes(test_examples, takes, evaluators, pipe.session.num_bins)
        results["second_take"] = evaluate_scores(syntheses["second_take"], bootstrap, seed, metrics)
    unscored = {label: unscored_summary(synthesis, metrics) for label, synthesis in syntheses.items()}
    sweep_results = {}
    for count, item in sweep.items():
        synthesis = synthesize_and_score(
            item.model, test_examples, speaker, vocoder, evaluators, pipe.session.num_bins
        )
        report = evaluate_scores(synthesis, bootstrap, seed, metrics)
        sweep_results[count] = {name: report[name].to_dict() for name in report}
        unscored[f"sweep_{count}_clips"] = unscored_summary(synthesis, metrics)
    adapter_dir = run_dir / "adapters" / pipe.name
    checks = _checks(backbone.model, adapted[pipe.name].model, pipe.name, adapter_dir, test_examples)
    shown = min(options.data.plot_clips, len(test_examples))
    plot_mels(
        run_dir / "mels.png",
        [e.mel for e in test_examples[:shown]],
        {label: s.mels[:shown] for label, s in syntheses.items()},
        [e.utterance.path.stem for e in test_examples[:shown]],
    )
    samples = []
    for label, synthesis in syntheses.items():
        if label == "second_take":  # real recordings already, at their own rate
            continue
        samples += write_samples(
            run_dir / "samples", label, synthesis, test_examples, options.data.samples, AUDIO.sample_rate
        )
    weights_file = adapter_dir / "adapter_model.safetensors"
    size = sum(f.stat().st_size for f in adapter_dir.glob("*.safetensors"))
    main = adapted[pipe.name]
    notes = [
        "Mel spectrograms, recording against each model's synthesis (first test clips): ![mels](mels.png)",
        f"Synthesised WAV files (22,050 Hz) are in samples/: {', '.join(samples[:6])}"
        + (" ..." if len(samples) > 6 else ""),
        f"Every model speaks as base speaker '{backbone.speakers[speaker]}', the nearest by speaker-ID "
        f"cosine ({cosines[speaker]:.3f}) to the target's adaptation clips (speaker 0 without evaluators); "
        "only the adapted weights carry the new voice.",
        "Disabling the adapter reproduces the base bit for bit: "
        f"{checks['disabled_adapter_equals_base']}; the saved "
        f"adapter reloads to identical mels: {checks['reloaded_adapter_equals_trained']}.",
        *_reference_notes(pipe, takes, test_examples),
        *METRIC_NOTES,
        *unscored_notes(unscored),
    ]
    train_results = [item.result for item in adapted.values() if item.result is not None]
    return RunResult(
        name=pipe.recipe.name if pipe.recipe else "speaker_adaptation",
        pipeline="speech/speaker_adaptation",
        task="speech",
        headline_metric=_headline(pipe),
        primary_model=pipe.name,
        results=results,
        predictions={},
        parameters=parameters,
        histories=histories,
        info={
            "backbone": {k: v for k, v in backbone.info.items() if k != "history"}
            | {"vocoder": vocoder.source},
            "adapter": {
                "method": pipe.adapter.method,
                "spec": pipe.adapter,
                "file": str(weights_file),
                "file_size_bytes": size,
                "trainable_parameters": main.parameters.trainable,
                "fraction_of_base": main.parameters.trainable / base_total,
            },
            "dataset": {
                "name": "fsdd",
                "sha256": FSDD_SHA256,
                "target_speaker": target,
                "splits": {"adaptation": len(train_examples), "test": len(test_examples)},
            },
            "cost": {
                "wall_time_s": round(time.perf_counter() - started, 1),
                "peak_memory_bytes": max((r.peak_memory_bytes for r in train_results), default=0),
                "samples_per_second": sum(r.samples_per_second for r in train_results)
                / max(len(train_results), 1),
                "train_time_s": {label: round(item.wall_time_s, 2) for label, item in adapted.items()},
            },
            "notes": notes,
            "extra": {
                "checks": checks,
                "nearest_speaker_cosines": {backbone.speakers[k]: v for k, v in cosines.items()},
                "sweep_adaptation_clips": sweep_results,
                "reference_models": [label for label in REFERENCE_MODELS if label in results],
                "second_takes": {
                    e.utterance.path.stem: t.utterance.path.stem
                    for e, t in zip(test_examples, takes or [], strict=False)
                },
                "unscored": unscored,
                "evaluators": evaluators.meta if evaluators is not None else None,
            },
        },
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


def _reference_notes(pipe, takes, test_examples) -> list[str]:
    data = pipe.options.data
    rows = []
    if data.vocode_reference:
        rows.append(
            "vocoded_recording scores the recordings' own mels through the vocoder, the floor any synthesis "
            "through this vocoder can reach"
        )
    if takes is not None:
        rows.append(
            "second_take scores another real take of the same digit by the same speaker against each test "
            "recording: what natural variation alone gives (its speaker_similarity, real against real, is "
            "the ceiling of that metric)"
        )
    notes = (
        ["Reference rows, not competitors (report.json extra.reference_models): " + "; ".join(rows) + "."]
        if rows
        else []
    )
    if takes is not None:
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
    elif data.second_take_reference:
        notes.append("No second_take row: some test digit has no take left that is neither scored nor used.")
    return notes


def base_run(pipe, run_dir: Path, backbone, evaluators, vocoder, started: float) -> RunResult:
    """Score the base model on each base speaker's test clips (as that speaker)."""
    data = pipe.options.data
    metrics, bootstrap = _metrics(pipe), _bootstrap(pipe)
    tests = [
        e
        for s in backbone.speakers
        for e in pipe.session.speaker_examples(s, "test")
        if e.utterance.index < data.eval_clips_per_digit
    ]
    syntheses = [
        synthesize_and_score(backbone.model, [e], e.speaker, vocoder, evaluators, pipe.session.num_bins)
        for e in tests
    ]
    merged = merge_syntheses(syntheses)
    report = evaluate_scores(merged, bootstrap, pipe.seed, metrics)
    plot_mels(
        run_dir / "mels.png",
        [e.mel for e in tests[:: max(1, len(tests) // 3)][:3]],
        {"base": merged.mels[:: max(1, len(tests) // 3)][:3]},
        [e.utterance.path.stem for e in tests[:: max(1, len(tests) // 3)][:3]],
    )
    samples = write_samples(run_dir / "samples", "base", merged, tests, data.samples, AUDIO.sample_rate)
    training = backbone.info.get("training", {})
    count = sum(p.numel() for p in backbone.model.parameters())
    return RunResult(
        name=pipe.recipe.name if pipe.recipe else "base_multispeaker",
        pipeline="speech/base_multispeaker",
        task="speech",
        headline_metric=_headline(pipe),
        primary_model="base",
        results={"base": report},
        parameters={"base": {"trainable": count, "total": count, "fraction": 1.0}},
        histories={"base": backbone.info["history"]} if "history" in backbone.info else {},
        info={
            "backbone": {k: v for k, v in backbone.info.items() if k != "history"}
            | {"vocoder": vocoder.source},
            "adapter": {"method": "none (base training)"},
            "dataset": {
                "name": "fsdd",
                "sha256": FSDD_SHA256,
                "base_speakers": backbone.speakers,
                "splits": {"train": training.get("train_clips"), "test_scored": len(tests)},
            },
            "cost": {
                "wall_time_s": round(time.perf_counter() - started, 1),
                "base_training_s": training.get("wall_time_s"),
            },
            "notes": [
                "Mel spectrograms, recording against synthesis: ![mels](mels.png)",
                f"Synthesised WAV files in samples/: {', '.join(samples)}",
                "The base was loaded from the cache (trained earlier)."
                if backbone.info.get("cached")
                else "The base was trained in this run and cached.",
                *METRIC_NOTES,
                *unscored_notes({"base": unscored_summary(merged, metrics)}),
            ],
            "extra": {"evaluators": evaluators.meta, "unscored": {"base": unscored_summary(merged, metrics)}},
        },
    )
