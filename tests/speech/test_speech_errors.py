"""A user's bad audio or speaker folder gives one line naming the file and the fix, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines import cli
from pipelines.speech.audio import AudioError, load_wav, write_wav
from pipelines.speech.data import Utterance, load_example

RECIPES = Path(__file__).resolve().parents[2] / "pipelines" / "recipes" / "speech"


def _clip(path: Path, seconds: float = 0.3, rate: int = 8000) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    return write_wav(path, 0.5 * np.sin(2 * np.pi * 150 * t), rate)


def _truncated(path: Path, keep: int) -> Path:
    data = _clip(path).read_bytes()
    path.write_bytes(data[:keep])
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: _truncated(p, 44 + 300),
         r"x\.wav is truncated: its header declares 4,800 bytes of samples, the file holds 300; export it"),
        (lambda p: _truncated(p, 44), r"x\.wav is truncated: .* the file holds 0;"),
        (lambda p: _truncated(p, 20), r"x\.wav is not a WAV/FLAC file soundfile can read \(.*\); convert it"),
        (lambda p: p.write_text("hello, not audio"), r"x\.wav is not a WAV/FLAC file soundfile can read"),
        (lambda p: p.write_bytes(b""), r"x\.wav is not a WAV/FLAC file soundfile can read"),
        (lambda p: _clip(p, seconds=0.02), r"x\.wav holds 160 samples \(20 ms at 8000 Hz\); a clip needs at "
                                           r"least 50 ms"),
    ],
)  # fmt: skip
def test_bad_audio_files_are_named_with_what_is_wrong(tmp_path, make, expected):
    path = tmp_path / "x.wav"
    make(path)
    with pytest.raises(AudioError, match=expected):
        load_wav(path)
    with pytest.raises(AudioError, match=expected):  # the featuriser reads through load_wav
        load_example(Utterance(path, "seven", "me"), 0)


def test_a_streamed_wav_of_unknown_length_is_not_truncated(tmp_path):
    path = _clip(tmp_path / "x.wav")
    data = bytearray(path.read_bytes())
    data[40:44] = (0xFFFFFFFF).to_bytes(4, "little")  # data size unknown, as streaming writers leave it
    path.write_bytes(bytes(data))
    wav, rate = load_wav(path)
    assert rate == 8000 and len(wav) == 2400


def test_a_missing_audio_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"audio file .*gone\.wav does not exist"):
        load_wav(tmp_path / "gone.wav")


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the command line; assert it fails with exactly one line on stderr and return that line."""
    capsys.readouterr()
    assert cli.main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("peft-pipelines: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: _truncated(f / "b.wav", 100), r"audio file .*train/b\.wav is truncated"),
    ],
)
def test_a_recipe_with_a_bad_speaker_folder_fails_in_one_line(tmp_path, capsys, damage, expected):
    train, test = tmp_path / "train", tmp_path / "test"
    for folder, names in ((train, "ab"), (test, "c")):
        folder.mkdir()
        for name in names:
            _clip(folder / f"{name}.wav")
            (folder / f"{name}.txt").write_text("one")
    damage(train)
    recipe = yaml.safe_load((RECIPES / "speecht5_speaker_adapter.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "runs")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    line = _one_line_error(
        capsys,
        ["run", str(tmp_path / "recipe.yaml"), "backbone.name=test_tiny_speecht5",
         f"data.options.speaker_folder={train}", f"data.options.test_folder={test}",
         "data.options.adaptation_clips=all"],
    )  # fmt: skip
    assert re.search(expected, line), line
