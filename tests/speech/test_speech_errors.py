"""A user's bad audio or speaker folder gives one line naming the file and the fix, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines import cli
from pipelines.speech.audio import AudioError, load_wav, write_wav
from pipelines.speech.data import Utterance, folder_utterances, load_example

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


def _folder(folder: Path, names=("a", "b"), metadata: str | None = None) -> Path:
    folder.mkdir()
    for name in names:
        _clip(folder / f"{name}.wav")
    if metadata is not None:
        (folder / "metadata.csv").write_text(metadata, encoding="utf-8")
    return folder


def test_metadata_csv_in_the_ljspeech_convention(tmp_path):
    folder = _folder(tmp_path / "me", ("a", "b", "c"), "a|Seven.\nb.wav|hello there\n\nc|7 raw|seven\n")
    utterances = folder_utterances(folder, speaker="me")
    assert [(u.path.name, u.text, u.speaker, u.digit) for u in utterances] == [
        ("a.wav", "Seven.", "me", 7),
        ("b.wav", "hello there", "me", None),
        ("c.wav", "seven", "me", 7),  # of LJSpeech's three columns, the normalised text
    ]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ("a|one\nb\n", r"metadata\.csv line 2 has 1 column\(s\); write 'file name\|transcript'"),
        ("a|one\nb|two|2|x\n", r"metadata\.csv line 2 has 4 column\(s\)"),
        ("a|one\nzz|two\n", r"line 2 names 'zz', which is not a \.wav file in .*me; fix the name or remove"),
        ("file|text\na|one\n", r"line 1 names 'file', .* \(metadata\.csv has no header line\)"),
        ("a|one\nb|two\na|three\n", r"line 3 lists 'a' again \(first on line 1\)"),
        ("a|one\nb| \n", r"line 2 has an empty transcript for 'b'"),
        ("a|one\n", r"no transcript for .*b\.wav; add a line 'b\|what it says' to .*metadata\.csv$"),
    ],
)  # fmt: skip
def test_metadata_csv_faults_name_the_line_and_the_fix(tmp_path, metadata, expected):
    folder = _folder(tmp_path / "me", metadata=metadata)
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        folder_utterances(folder)


def test_folder_faults_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"speaker folder .*nowhere does not exist"):
        folder_utterances(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.wav files in .*empty"):
        folder_utterances(tmp_path / "empty")
    folder = _folder(tmp_path / "me", ("a",))
    with pytest.raises(FileNotFoundError, match=r"no transcript for .*a\.wav; .* or a file a\.txt beside it"):
        folder_utterances(folder)
    (folder / "metadata.csv").write_bytes("a|sept\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata\.csv is not UTF-8 text \(byte 6\); save it as UTF-8"):
        folder_utterances(folder)


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
        (lambda f: (f / "metadata.csv").write_text("a|one\nc|two\n"), r"line 2 names 'c', which is not"),
        (lambda f: (f / "metadata.csv").write_text("a|one\nb\n"), r"line 2 has 1 column\(s\)"),
    ],
)
def test_a_recipe_with_a_bad_speaker_folder_fails_in_one_line(tmp_path, capsys, damage, expected):
    train = _folder(tmp_path / "train", metadata="a|one\nb|two\n")
    test = _folder(tmp_path / "test", ("c",), metadata="c|three\n")
    damage(train)
    recipe = yaml.safe_load((RECIPES / "speecht5_speaker_adapter.yaml").read_text())
    recipe["output_dir"], recipe["data"]["options"] = str(tmp_path / "runs"), {"samples": 1}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    line = _one_line_error(
        capsys,
        ["run", str(tmp_path / "recipe.yaml"), "backbone.name=test_tiny_speecht5",
         f"data.options.speaker_folder={train}", f"data.options.test_folder={test}",
         "data.options.adaptation_clips=all"],
    )  # fmt: skip
    assert re.search(expected, line), line


@pytest.mark.parametrize(
    ("backbone", "options", "expected"),
    [
        ("test_tiny_speecht5", {"test_folder": "t"}, ["data.options.test_folder: test_folder is read with "
                                                      "speaker_folder; set both"]),
        ("test_tiny_speecht5", {"speaker_folder": "s"}, ["data.options.test_folder: speaker_folder needs "
                                                         "test_folder"]),
        ("test_tiny_speecht5", {"speaker_folder": "s", "test_folder": "t", "target_speaker": "theo",
                                "eval_clips_per_digit": 2},
         ["data.options.target_speaker: target_speaker chooses FSDD clips; with speaker_folder all",
          "data.options.eval_clips_per_digit: eval_clips_per_digit chooses FSDD clips"]),
        ("fsdd_multispeaker", {"speaker_folder": "s", "test_folder": "t", "target_speaker": "theo"},
         ["data.options.target_speaker: target_speaker chooses FSDD clips; with speaker_folder all"]),
    ],
)  # fmt: skip
def test_validate_refuses_speaker_folder_options_that_would_go_unread(tmp_path, backbone, options, expected):
    from pipelines.core.recipe import validate_recipe_file

    recipe = yaml.safe_load((RECIPES / "speecht5_speaker_adapter.yaml").read_text())
    recipe["backbone"]["name"], recipe["data"]["options"] = backbone, options
    if backbone == "fsdd_multispeaker":
        recipe["backbone"]["options"], recipe["compare"] = {}, ["lora"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    errors = validate_recipe_file(tmp_path / "recipe.yaml")
    messages = sorted(f"{error.path}: {error.message}" for error in errors)
    assert len(messages) == len(expected), messages
    for message, start in zip(messages, sorted(expected), strict=True):
        assert message.startswith(start), messages


@pytest.mark.parametrize(
    ("backbone", "path", "value", "reader"),
    [
        ("test_tiny_speecht5", "data.options.plot_clips", 5, "the built-in FSDD acoustic model reads it"),
        ("test_tiny_speecht5", "data.options.evaluators", False, "the built-in FSDD acoustic model reads it"),
        ("test_tiny_speecht5", "data.options.vocode_reference", False, "the built-in FSDD acoustic model"),
        ("test_tiny_speecht5", "backbone.options.steps", 5, "the built-in FSDD acoustic model reads it"),
        ("test_tiny_speecht5", "backbone.options.vocoder", "griffin_lim", "the built-in FSDD acoustic model"),
        ("fsdd_multispeaker", "backbone.options.hf_vocoder", "x", "transformers backbones (hf:<id>, a"),
        ("fsdd_multispeaker", "backbone.options.local_files_only", True, "transformers backbones"),
    ],
)  # fmt: skip
def test_validate_refuses_what_the_chosen_backbone_does_not_read(tmp_path, backbone, path, value, reader):
    """Each speech option is read by one kind of backbone; beside the other it is refused, not ignored."""
    from pipelines.core.recipe import validate_recipe_file

    recipe = yaml.safe_load((RECIPES / "speecht5_speaker_adapter.yaml").read_text())
    recipe["backbone"]["name"] = backbone
    if backbone == "fsdd_multispeaker":
        recipe["backbone"]["options"], recipe["compare"] = {}, ["lora"]
    section, _, key = path.rpartition(".")
    recipe[section.split(".")[0]]["options"][key] = value
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (error,) = validate_recipe_file(tmp_path / "recipe.yaml")
    assert error.path == path and error.message.startswith(reader) and error.message.endswith(": remove it")


@pytest.mark.parametrize("field", ["eval_every", "early_stopping_patience"])
def test_validate_refuses_evaluation_settings_speaker_adaptation_cannot_honour(field):
    from pipelines.core.recipe import validate_recipe_file

    (error,) = validate_recipe_file(RECIPES / "fsdd_speaker_adapter.yaml", [f"stages.0.train.{field}=2"])
    assert error.path == f"stages.0.train.{field}"
    assert error.message == f"speaker adaptation has no validation clips to evaluate; remove {field}"
