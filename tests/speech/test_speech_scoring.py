"""Per-utterance scoring: registered metrics, resampling, unscored counts, second takes, evaluators."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.core.evaluation import evaluate
from pipelines.speech.adaptation import second_takes
from pipelines.speech.audio import load_wav, resample, write_wav
from pipelines.speech.data import Utterance
from pipelines.speech.metrics import mcd_db
from pipelines.speech.scoring import (
    NOT_VOICED_IN_BOTH,
    SCORE_COLUMNS,
    SPEECH_METRICS,
    score_waveforms,
    unscored_notes,
    unscored_summary,
)

pytest.importorskip("pyworld")


def _voice(f0: float, rate: int, seconds: float = 0.4, seed: int = 0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wav = 0.5 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(2 * np.pi * 2 * f0 * t)
    return (wav + 1e-3 * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


@pytest.mark.filterwarnings("ignore:.*bootstrap resamples were degenerate")
def test_speech_metrics_are_registered_and_average_the_scored_utterances():
    rows = np.full((3, len(SCORE_COLUMNS)), np.nan)
    column = {name: i for i, name in enumerate(SCORE_COLUMNS)}
    rows[:, column["mcd"]] = [4.0, 6.0, 8.0]
    rows[:, column["log_f0_rmse"]] = [10.0, np.nan, 30.0]
    rows[:, column["gpe"]] = [0.0, np.nan, 0.5]
    rows[:, column["speaker_similarity"]] = [0.5, 0.7, 0.9]
    rows[:, column["digit_prediction"]] = [3, 1, 2]
    report = evaluate(
        "speech", np.array([3, 1, 5]), rows, metrics=list(SPEECH_METRICS), bootstrap=200, seed=0
    )
    assert report["mcd"].value == pytest.approx(6.0)
    assert report["log_f0_rmse"].value == pytest.approx(20.0)
    assert report["gpe"].value == pytest.approx(0.25)
    assert report["speaker_similarity"].value == pytest.approx(0.7)
    assert report["intelligibility"].value == pytest.approx(2 / 3)
    assert report["mcd"].low >= 4.0 and report["mcd"].high <= 8.0


def test_score_waveforms_resamples_to_the_recordings_rate_and_says_what_it_could_not_score(tmp_path):
    recording = _voice(150.0, 8000)
    path = write_wav(tmp_path / "3_target_0.wav", recording, 8000)
    utterance = Utterance(Path(path), "three", "target", 3, 0)
    synthesis = resample(_voice(150.0, 8000, seed=1), 8000, 22050)
    silence = 1e-3 * np.random.default_rng(2).standard_normal(len(synthesis)).astype(np.float32)
    mel = torch.zeros(20, 80)
    scored = score_waveforms([utterance] * 2, [synthesis, silence], 22050, [mel, mel], [mel, mel + 1.0], 62)
    column = {name: i for i, name in enumerate(SCORE_COLUMNS)}
    stored, rate = load_wav(path)
    # scored at 8 kHz against the stored recording (peak-normalised first, which MCD ignores up to rounding)
    assert scored.scores[0, column["mcd"]] == pytest.approx(
        mcd_db(stored, resample(synthesis, 22050, 8000), rate), rel=1e-5
    )
    assert scored.scores[0, column["gpe"]] == 0.0 and scored.scores[0, column["f0_coverage"]] > 0.8
    assert math.isnan(scored.scores[1, column["log_f0_rmse"]]) and scored.scores[1, column["vde"]] > 0.8
    assert scored.scores[1, column["log_mel_cepstral_distance"]] == pytest.approx(0.0, abs=1e-9)
    summary = unscored_summary(scored)
    assert summary["log_f0_rmse"] == {"count": 1, "of": 2, "reasons": {NOT_VOICED_IN_BOTH: 1}}
    assert summary["gpe"]["count"] == 1 and "mcd" not in summary
    assert summary["speaker_similarity"]["count"] == 2  # no evaluators
    note = unscored_notes({"speaker": summary})[0]
    assert note.startswith("Utterances not scored, speaker: ") and "log_f0_rmse 1 of 2" in note
    assert unscored_notes({"speaker": {}}) == ["Every metric scored every test utterance of every model."]


def test_second_takes_are_neither_scored_nor_used_for_adaptation():
    def clip(digit: int, index: int) -> Utterance:
        return Utterance(Path(f"{digit}_s_{index}.wav"), str(digit), "s", digit, index)

    clips = [clip(d, i) for d in (1, 2) for i in range(8)]
    test = [clip(1, 0), clip(1, 1), clip(2, 0)]
    used = {clip(1, 2).path, clip(2, 1).path}
    takes = second_takes(test, clips, used)
    assert [t.path.name for t in takes] == ["1_s_3.wav", "1_s_4.wav", "2_s_2.wav"]
    assert second_takes(test, clips[:3] + clips[8:], used) is None  # digit 1: no take left


def test_the_speaker_id_evaluator_never_sees_the_held_out_speaker(tmp_path, monkeypatch):
    from pipelines.speech.data import FSDD_SPEAKERS, Example
    from pipelines.speech.evaluators import load_evaluators

    monkeypatch.setenv("PEFT_PIPELINES_CACHE", str(tmp_path))
    generator = torch.Generator().manual_seed(0)

    def example(speaker: str, digit: int, offset: float) -> Example:
        mel = torch.randn(12, 80, generator=generator) + offset
        utterance = Utterance(Path(f"{digit}_{speaker}_5.wav"), str(digit), speaker, digit, 5)
        return Example(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), mel, 0, utterance)

    train = [example(s, d, 5.0 if s == "yweweler" else 0.0) for s in FSDD_SPEAKERS for d in range(10)]
    base = [s for s in FSDD_SPEAKERS if s != "yweweler"]
    evaluators = load_evaluators(lambda: (train, train[:12]), speakers=base)
    bins = evaluators.speaker_id.num_bins
    base_mean = torch.cat([e.mel[:, :bins] for e in train if e.utterance.speaker != "yweweler"]).mean(dim=0)
    torch.testing.assert_close(evaluators.speaker_id.mean, base_mean)
    assert evaluators.speaker_id.classifier.out_features == 5
    assert evaluators.meta["speaker_id"]["never_heard"] == ["yweweler"]
    all_mean = torch.cat([e.mel[:, :bins] for e in train]).mean(dim=0)
    torch.testing.assert_close(evaluators.digit.mean, all_mean)


def test_mel_bin_frequencies_are_the_filterbank_peaks():
    import torchaudio.functional as F

    from pipelines.speech.audio import AUDIO
    from pipelines.speech.plots import mel_bin_frequencies

    fbanks = F.melscale_fbanks(513, 0.0, 8000.0, 80, 22050, norm="slaney", mel_scale="slaney")
    peaks_hz = fbanks.argmax(dim=0).numpy() * 22050 / 1024
    assert np.abs(mel_bin_frequencies(AUDIO) - peaks_hz).max() <= 22050 / 1024


def test_mel_grid_has_time_and_frequency_axes_and_a_db_colour_bar():
    from pipelines.speech.plots import mel_figure

    mel = torch.linspace(-11.0, 1.0, 43 * 80).reshape(43, 80)
    figure = mel_figure([mel], {"speaker": [mel[:30]]}, ["7_me_0"])
    recording, synthesis, bar = figure.axes
    image = recording.get_images()[0]
    np.testing.assert_allclose(image.get_array(), 20 * np.log10(np.exp(mel.double().numpy().T)), rtol=1e-6)
    assert image.get_extent()[:2] == [0.0, pytest.approx(43 * 256 / 22050)]
    assert synthesis.get_images()[0].get_extent()[1] == pytest.approx(30 * 256 / 22050)
    assert recording.get_xlabel() == "time (s)" and recording.get_ylabel() == "frequency (Hz, mel scale)"
    labels = [t.get_text() for t in recording.get_yticklabels()]
    assert labels == ["250", "500", "1000", "2000", "4000"]  # 8000 Hz lies above the top bin's centre
    assert "dB" in bar.get_ylabel() and bar.get_ylim() == (-100.0, 20.0)
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_intelligibility_is_sklearn_accuracy_over_the_clips_with_a_digit():
    from sklearn.metrics import accuracy_score

    from pipelines.core.evaluation.registry import get_metric

    rng = np.random.default_rng(0)
    digits = rng.integers(0, 10, 40)
    digits[[3, 17]] = -1  # transcripts that are not one digit word
    predicted = np.where(rng.random(40) < 0.6, digits, rng.integers(0, 10, 40)).astype(float)
    predicted[[5, 8]] = np.nan  # clips the classifier could not read
    rows = np.full((40, len(SCORE_COLUMNS)), np.nan)
    rows[:, SCORE_COLUMNS.index("digit_prediction")] = predicted
    known = (digits >= 0) & np.isfinite(predicted)
    spec = get_metric("intelligibility")
    assert spec.fn(digits, rows) == pytest.approx(accuracy_score(digits[known], predicted[known]))
    weights = rng.integers(0, 3, (5, 40)).astype(float)  # bootstrap resample counts
    expected = [accuracy_score(digits[known], predicted[known], sample_weight=w[known]) for w in weights]
    np.testing.assert_allclose(spec.batched(digits, rows, weights), expected)


class _DigitEvaluators:
    """Stands in for the FSDD evaluators: predicts a fixed digit per clip and records what it was shown."""

    def __init__(self, predictions):
        self.predictions, self.shown = np.asarray(predictions), []

    def digit_predictions(self, mels):
        self.shown.append([tuple(m.shape) for m in mels])
        return self.predictions[: len(mels)]


@pytest.mark.filterwarnings("ignore:.*bootstrap resamples were degenerate")
def test_the_recording_row_scores_the_real_test_clips_for_intelligibility_only():
    from sklearn.metrics import accuracy_score

    from pipelines.speech.data import Example
    from pipelines.speech.report import reference_results

    digits = [3, 7, None, 1]
    examples = [
        Example(torch.zeros(3), torch.zeros(3), torch.full((20 + i, 80), -5.0), 0,
                Utterance(Path(f"c{i}.wav"), "x", "me", d))
        for i, d in enumerate(digits)
    ]  # fmt: skip
    evaluators = _DigitEvaluators([3, 2, 5, 1])
    results = reference_results({}, examples, evaluators, 100, 0, list(SPEECH_METRICS))
    assert list(results) == ["recording"] and list(results["recording"]) == ["intelligibility"]
    assert evaluators.shown == [[(20, 80), (21, 80), (22, 80), (23, 80)]]  # the recordings' own mels
    assert results["recording"]["intelligibility"].value == pytest.approx(
        accuracy_score([3, 7, 1], [3, 2, 1])
    )
    assert reference_results({}, examples, None, 100, 0, list(SPEECH_METRICS)) == {}
    assert reference_results({}, examples, evaluators, 100, 0, ["mcd"]) == {}


def test_transformers_syntheses_are_scored_for_intelligibility_in_the_evaluators_features(tmp_path):
    from pipelines.speech.hf_adaptation import add_intelligibility
    from pipelines.speech.hf_features import HfExample
    from pipelines.speech.scoring import EMPTY, NO_DIGIT, Synthesis

    waveforms = [_voice(150.0, 16000, seconds=0.5), np.zeros(0, dtype=np.float32), _voice(200.0, 16000)]
    utterances = [Utterance(Path(f"{d}.wav"), "x", "me", d) for d in (4, 2, None)]
    examples = [HfExample(torch.zeros(2), torch.zeros(4, 8), utterance=u) for u in utterances]
    reasons = [{"intelligibility": "no evaluators (data.options.evaluators is off)"} for _ in examples]
    synthesis = Synthesis(
        np.full((3, len(SCORE_COLUMNS)), np.nan), np.array([4, 2, -1]), waveforms, [], reasons
    )
    evaluators = _DigitEvaluators([4, 9])
    scored = add_intelligibility(synthesis, examples, 16000, evaluators)
    # 16 kHz audio resampled to 22,050 Hz, in frames of 256 samples, 80 mel bins
    assert evaluators.shown == [[(int(0.5 * 22050) // 256, 80), (int(0.4 * 22050) // 256, 80)]]
    column = scored.scores[:, SCORE_COLUMNS.index("digit_prediction")]
    assert column[0] == 4 and math.isnan(column[1]) and column[2] == 9
    assert scored.unscored == [{}, {"intelligibility": EMPTY}, {"intelligibility": NO_DIGIT}]


def test_reference_notes_name_the_recording_row_and_folder_takes():
    from pipelines.speech.data import Example
    from pipelines.speech.notes import reference_notes
    from pipelines.speech.options import AdaptationDataOptions

    def example(name: str, index=None) -> Example:
        utterance = Utterance(Path(name), "one", "me", 1, index)
        return Example(torch.zeros(3), torch.zeros(3), torch.zeros(4, 80), 0, utterance)

    data = AdaptationDataOptions(vocode_reference=False)
    folder = reference_notes(data, [example("b.wav")], [example("a.wav")], recording=True)
    assert folder[0].startswith("Reference rows, not competitors") and "second_take" in folder[0]
    assert "recording scores the real test recordings themselves with the digit classifier" in folder[0]
    assert folder[1].startswith("second_take uses other takes of the test texts in the speaker's folders")
    fsdd = reference_notes(data, [example("1_me_1.wav", 1)], [example("1_me_0.wav", 0)])
    assert "recording scores" not in fsdd[0]
    assert fsdd[1].startswith("second_take uses the takes with FSDD indices [1] (test split")


def test_disabled_equals_base_compares_the_probe_with_the_adapters_off():
    """True for an adapter that changes the output; False once a base weight of the copy differs."""
    import copy

    from pipelines.core.peft import Bottleneck, add_adapter
    from pipelines.speech.backbones import tiny_random_model
    from pipelines.speech.model import adapter_targets
    from pipelines.speech.report import disabled_equals_base

    base = tiny_random_model(2)
    adapted = copy.deepcopy(base)
    add_adapter(adapted, Bottleneck(targets=adapter_targets(), hidden=2), name="voice")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".adapters.voice." in name:
                parameter.normal_()
    tokens = torch.tensor([1, 18, 17, 8, 1])

    def probe(model):
        return model.eval().synthesize(tokens, 1)

    assert disabled_equals_base(base, adapted, probe)
    assert not torch.equal(probe(adapted), probe(base))  # the adapter is on outside the check
    with torch.no_grad():
        adapted.speaker_embedding.weight.add_(1.0)
    assert not disabled_equals_base(base, adapted, probe)
