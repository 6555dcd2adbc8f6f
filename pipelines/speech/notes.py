"""What the speech reports say in prose beside the scores: the metric notes and each run's notes.

One builder per hooks class (:func:`adaptation_notes` for the FSDD base, :func:`hf_notes` for a
transformers backbone, :func:`base_notes` for the base recipe) and :func:`reference_notes` for the
reference rows; each returns the report's lines in the order they are shown.
"""

from __future__ import annotations

__all__ = [
    "METRIC_NOTES", "HF_NOTES", "DURATION_NOTE", "RECORDING_NOTE",
    "adaptation_notes", "hf_notes", "base_notes", "reference_notes",
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
RECORDING_NOTE = (
    "recording scores the real test recordings themselves with the digit classifier, the intelligibility "
    "a synthesis is read against (that metric only: any other would compare a recording with itself)"
)

HF_NOTES = [
    "mcd: mel-cepstral distortion in dB as TTS papers compute it: the synthesis is resampled to the "
    "recording's own rate (8 kHz for FSDD), both go through WORLD (harvest F0, CheapTrick envelope, 5 ms "
    "frames) and pysptk.sp2mc (order 24, all-pass constant of that rate); c1-c24, DTW-aligned, "
    "10/ln10*sqrt(2*sum(dc^2)) averaged over the aligned frames.",
    "log_f0_rmse (cents), gpe, vde, f0_coverage: WORLD harvest F0 of both waveforms on the MCD's frames "
    "and DTW path; log-F0 RMSE and GPE (F0 off by more than 20%) over the frames voiced in both, VDE the "
    "share of aligned frames whose voicing differs, f0_coverage the share voiced in both.",
    "log_mel_cepstral_distance: dB, RMS over the model's mel bins below half the recording's rate of the "
    "level-free log-mel difference kept to c1-c24 of the orthonormal DCT; a second view, not the MCD.",
]
DURATION_NOTE = (
    "FastSpeech2Conformer durations: transformers has no aligner, so each clip's voiced span is split evenly "
    "over its phones (leading silence to the first phone, trailing silence to <sos/eos>); token pitch and "
    "energy are standardised over the adaptation clips (ESPnet's global statistics are not published)."
)


def adaptation_notes(
    samples: list[str], speaks_as: str, cosine: float, base_total: int, total: int, disabled_ok: bool
) -> list[str]:
    """An FSDD-base adaptation run's notes before the reference rows': the mel figure, the WAV files, the
    base speaker every model speaks as (``cosine``: its speaker-ID cosine to the target's adaptation
    clips), the parameters the adapter adds (``total`` against ``base_total``) and the disable check."""
    return [
        "Mel spectrograms, recording against each model's synthesis (first test clips): "
        "![mels](mels.png)",
        "Synthesised WAV files (22,050 Hz) are in samples/: "
        + ", ".join(samples[:6]) + (" ..." if len(samples) > 6 else ""),
        f"Every model speaks as base speaker '{speaks_as}', the nearest by speaker-ID cosine "
        f"({cosine:.3f}) to the target's adaptation clips (speaker 0 without evaluators); only the adapted "
        "weights carry the new voice.",
        f"Parameters: trainable are the weights a model trained, as a fraction of all its parameters, "
        f"adapters included (the base alone has {base_total:,}; the adapter adds "
        f"{total - base_total:,}).",
        f"Disabling the adapter reproduces the base bit for bit: {disabled_ok}.",
    ]  # fmt: skip


def hf_notes(samples: list[str], sample_rate: int, checks: dict[str, bool], family: str) -> list[str]:
    """A transformers-backbone run's notes: the WAV files, both checks, the metrics and (FastSpeech2Conformer)
    how its durations, pitch and energy targets were made."""
    notes = [
        f"Synthesised WAV files ({sample_rate} Hz) are in samples/: " + ", ".join(samples[:6]),
        "Disabling the adapter reproduces the base bit for bit: "
        f"{checks['disabled_adapter_equals_base']}; the saved adapter reloads to identical mels: "
        f"{checks['reloaded_adapter_equals_trained']}.",
        "Parameters: trainable are the weights a model trained, as a fraction of all its parameters, "
        "adapters included.",
        *HF_NOTES,
    ]
    return notes + ([DURATION_NOTE] if family == "fastspeech2_conformer" else [])


def base_notes(samples: list[str], cached: bool) -> list[str]:
    """The base recipe's notes: the mel figure, the WAV files, whether the base was trained now, the
    metrics."""
    return [
        "Mel spectrograms, recording against synthesis: ![mels](mels.png)",
        f"Synthesised WAV files in samples/: {', '.join(samples)}",
        "The base was loaded from the cache (trained earlier)." if cached
        else "The base was trained in this run and cached.",
        *METRIC_NOTES,
    ]  # fmt: skip


def reference_notes(data, takes, test_examples, recording: bool = False) -> list[str]:
    """What the reference rows are (``data``: AdaptationDataOptions; ``recording``: the row of
    :func:`~pipelines.speech.report.reference_results` is there), and which takes second_take used."""
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
