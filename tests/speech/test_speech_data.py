"""Speech data: folders with transcripts, text ids, durations, FSDD parsing and split."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.speech.audio import AUDIO, write_wav
from pipelines.speech.backbones import BaseSettings
from pipelines.speech.data import (
    VOCAB,
    collate_examples,
    digit_labels,
    folder_utterances,
    fsdd_utterances,
    load_example,
    split_fsdd,
    text_to_ids,
    uniform_durations,
)
from pipelines.speech.fsdd import FsddSession
from pipelines.speech.options import AdaptationDataOptions
from pipelines.speech.targets import target_clips, target_utterances

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


def _user_folders(root: Path) -> tuple[Path, Path]:
    train, test = root / "train", root / "test"
    for folder, lines in ((train, "a|seven\nb|Hello.\n"), (test, "c|2\n")):
        folder.mkdir()
        for line in lines.splitlines():
            _write_clip(folder / f"{line.split('|')[0]}.wav")
        (folder / "metadata.csv").write_text(lines, encoding="utf-8")
    return train, test


def test_target_clips_of_a_users_folders_carry_their_digits_and_checksums(tmp_path):
    train, test = _user_folders(tmp_path)
    data = AdaptationDataOptions(speaker_folder=str(train), test_folder=str(test))
    target = target_clips(FsddSession(BaseSettings()), data, "yweweler", ["george"], "me")
    assert target.speaker == "me"
    assert [(e.utterance.path.name, e.utterance.digit, e.speaker) for e in target.candidates] == [
        ("a.wav", 7, 0),
        ("b.wav", None, 0),
    ]
    assert [(e.utterance.path.name, e.utterance.digit) for e in target.test] == [("c.wav", 2)]
    assert [u.path.name for u in target.takes_from] == ["a.wav", "b.wav", "c.wav"]
    # a folder's checksum: its files' bytes in sorted name order
    files = {train: ("a.wav", "b.wav", "metadata.csv"), test: ("c.wav", "metadata.csv")}
    digests = {
        f: hashlib.sha256(b"".join((f / n).read_bytes() for n in names)).hexdigest()
        for f, names in files.items()
    }
    assert target.info == {"name": str(train), "sha256": digests[train], "test_folder": str(test),
                           "test_sha256": digests[test], "target_speaker": "me"}  # fmt: skip


def test_target_clips_refuse_a_folder_without_held_out_clips(tmp_path):
    train, _ = _user_folders(tmp_path)
    session = FsddSession(BaseSettings())
    with pytest.raises(ValueError, match="speaker_folder needs data.options.test_folder"):
        target_clips(session, AdaptationDataOptions(speaker_folder=str(train)), "yweweler", [], "me")
    same = AdaptationDataOptions(speaker_folder=str(train), test_folder=str(train))
    with pytest.raises(ValueError, match=r"test_folder shares 2 clip\(s\) with speaker_folder \(a.wav"):
        target_clips(session, same, "yweweler", [], "me")
    with pytest.raises(ValueError, match="test_folder is read with speaker_folder; set both"):
        target_clips(session, AdaptationDataOptions(test_folder=str(train)), "yweweler", [], "me")
    with pytest.raises(ValueError, match="target_speaker 'george' is one of the base speakers"):
        target_clips(session, AdaptationDataOptions(target_speaker="george"), "yweweler", ["george"], "me")


def test_target_utterances_of_a_users_folders_for_a_transformers_backbone(tmp_path):
    """The first clips in digit round-robin order (a clip without a digit sorts as digit 0), the test
    folder whole; no per-digit draw when a clip has no digit; a folder without held-out clips refused."""
    train, test = _user_folders(tmp_path)
    data = AdaptationDataOptions(speaker_folder=str(train), test_folder=str(test), adaptation_clips=1)
    adaptation, scored, info = target_utterances(data, "me", "yweweler")
    assert [u.path.name for u in adaptation] == ["b.wav"] and [u.path.name for u in scored] == ["c.wav"]
    assert info == {"name": str(train), "test_folder": str(test)}
    everything = target_utterances(data.model_copy(update={"adaptation_clips": "all"}), "me", "yweweler")[0]
    assert digit_labels(everything) is None and digit_labels(scored) == [2]
    with pytest.raises(ValueError, match="speaker_folder needs data.options.test_folder"):
        target_utterances(AdaptationDataOptions(speaker_folder=str(train)), "me", "yweweler")
