"""Speech data: folders with transcripts, text ids, durations, FSDD parsing and split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.speech.audio import AUDIO, write_wav
from pipelines.speech.data import (
    VOCAB,
    collate_examples,
    folder_utterances,
    fsdd_utterances,
    load_example,
    split_fsdd,
    text_to_ids,
    uniform_durations,
)

MIRROR = Path(os.environ.get("PEFT_PIPELINES_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _write_clip(path: Path, seconds: float = 0.3) -> None:
    t = np.arange(int(8000 * seconds)) / 8000
    wav = np.concatenate([np.zeros(800), 0.5 * np.sin(2 * np.pi * 180 * t), np.zeros(800)])
    write_wav(path, wav, 8000)


def test_folder_reads_metadata_csv_and_text_files(tmp_path):
    _write_clip(tmp_path / "a.wav")
    _write_clip(tmp_path / "b.wav")
    (tmp_path / "metadata.csv").write_text("a|seven\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("two\n", encoding="utf-8")
    utterances = folder_utterances(tmp_path, speaker="me")
    assert [(u.path.name, u.text, u.speaker) for u in utterances] == [
        ("a.wav", "seven", "me"),
        ("b.wav", "two", "me"),
    ]


def test_folder_without_transcript_names_the_file(tmp_path):
    _write_clip(tmp_path / "a.wav")
    with pytest.raises(FileNotFoundError, match="no transcript for .*a.wav"):
        folder_utterances(tmp_path)


def test_text_ids_frame_the_text_with_silences():
    ids = text_to_ids("Six 7!")
    assert [VOCAB[i] for i in ids] == ["_", *"six seven", "_"]
    with pytest.raises(ValueError, match="has no letters"):
        text_to_ids("?!")


def test_uniform_durations_split_the_voiced_span_and_sum_to_the_frames():
    mel = torch.full((20, 80), -11.5)
    mel[5:15] = 0.0  # loud frames 5..14
    durations = uniform_durations(mel, 3)
    assert durations.tolist() == [5, 4, 3, 3, 5]
    assert int(durations.sum()) == 20


def test_example_is_resampled_featurised_and_batched(tmp_path):
    _write_clip(tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    example = load_example(folder_utterances(tmp_path)[0], speaker=1)
    frames = int(0.5 * AUDIO.sample_rate) // AUDIO.hop_length
    assert example.mel.shape == (frames, 80)
    assert int(example.durations.sum()) == frames and len(example.durations) == len(example.tokens) == 5
    batch = collate_examples([example, example])
    assert batch["mels"].shape == (2, frames, 80) and batch["speakers"].tolist() == [1, 1]


@pytest.mark.skipif(
    not (MIRROR / "fsdd" / "recordings").is_dir(), reason=f"FSDD is not in the data mirror {MIRROR}"
)
def test_fsdd_has_six_speakers_and_the_official_split():
    utterances = fsdd_utterances(MIRROR / "fsdd" / "recordings")
    assert len(utterances) == 3000
    assert len(split_fsdd(utterances, "train")) == 2700 and len(split_fsdd(utterances, "test")) == 300
    first = utterances[0]
    assert (first.path.name, first.text, first.speaker, first.digit, first.index) == (
        "0_george_0.wav",
        "zero",
        "george",
        0,
        0,
    )
