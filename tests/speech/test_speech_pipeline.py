"""The speech pipelines end to end on a tiny random acoustic model (lab code and the recipe path)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.core.peft import load_adapter
from pipelines.core.recipe import load_recipe
from pipelines.core.registry import create_pipeline
from pipelines.speech.adaptation import adaptation_clips
from pipelines.speech.audio import write_wav
from pipelines.speech.backbones import Backbone, tiny_random_model
from pipelines.speech.data import fsdd_utterances
from pipelines.speech.pipeline import SpeakerAdaptationPipeline

MIRROR = Path(os.environ.get("PEFT_PIPELINES_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "speech"


def _tiny_backbone() -> Backbone:
    speakers = ["george", "jackson", "lucas", "nicolas", "theo"]
    return Backbone(
        tiny_random_model(len(speakers)), speakers, {"name": "test_tiny", "weights": "random initialisation"}
    )


def _speaker_folder(folder: Path) -> Path:
    folder.mkdir()
    for i, (word, f0) in enumerate([("one", 120), ("two", 140), ("six", 160), ("nine", 180)]):
        t = np.arange(int(8000 * 0.3)) / 8000
        write_wav(
            folder / f"clip{i}.wav", np.concatenate([np.zeros(400), 0.5 * np.sin(2 * np.pi * f0 * t)]), 8000
        )
        (folder / f"clip{i}.txt").write_text(word, encoding="utf-8")
    return folder


def test_lab_code_fits_evaluates_synthesizes_and_saves(tmp_path):
    pipe = create_pipeline(
        "speech/speaker_adaptation",
        backbone=_tiny_backbone(),
        evaluators=False,
        speaker=1,
        train={"max_steps": 30, "batch_size": 4, "lr": 1e-2, "log_every": 5},
        backbone_options={"vocoder": "griffin_lim"},
    )
    folder = _speaker_folder(tmp_path / "wavs")
    result = pipe.fit(folder)
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert losses[-1] < losses[0]
    report = pipe.evaluate(folder, bootstrap=50)
    assert report.n_examples == 4 and math.isfinite(report["mcd"].value) and report["mcd"].value > 0
    assert math.isnan(report["intelligibility"].value)  # folder clips carry no digit labels
    wav = pipe.synthesize("one")
    assert wav.ndim == 1 and len(wav) > 0 and np.abs(wav).max() <= 1.0
    pipe.save_adapter(tmp_path / "adapter")
    reloaded = tiny_random_model(5)
    load_adapter(reloaded, tmp_path / "adapter")
    tokens = torch.tensor([1, 18, 17, 8, 1])
    assert torch.equal(reloaded.eval().synthesize(tokens, 1), pipe.model.synthesize(tokens, 1))
    again = create_pipeline("speech/speaker_adaptation", backbone=pipe.backbone, evaluators=False,
                            backbone_options={"vocoder": "griffin_lim"})  # fmt: skip
    again.load_adapter(tmp_path / "adapter")  # the adapter and the base speaker it speaks as
    assert again.speaker_id == 1 and np.array_equal(again.synthesize("one"), pipe.synthesize("one"))
    (tmp_path / "adapter" / "speech_adapter.json").unlink()
    with pytest.raises(FileNotFoundError, match="speech_adapter.json is missing: .* not saved by a speech"):
        again.load_adapter(tmp_path / "adapter")


def test_shipped_recipes_validate():
    for name in ("fsdd_base_multispeaker", "fsdd_speaker_adapter"):
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        assert recipe.pipeline.startswith("speech/")


@pytest.mark.skipif(
    not (MIRROR / "fsdd" / "recordings").is_dir(), reason=f"FSDD is not in the data mirror {MIRROR}"
)
def test_quick_run_compares_methods_on_fsdd(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_PIPELINES_DATA", str(MIRROR))
    pipe = create_pipeline(
        "speech/speaker_adaptation",
        backbone=_tiny_backbone(),
        train={"max_steps": 5, "batch_size": 4, "lr": 1e-2},
        backbone_options={"vocoder": "griffin_lim"},
        data_options={
            "adaptation_clips": 5,
            "eval_clips_per_digit": 1,
            "evaluators": False,
            "samples": 1,
            "plot_clips": 2,
            "vocode_reference": False,
        },
    )
    result = pipe.run(tmp_path)
    assert list(result.results) == ["speaker", "lora", "full_finetune", "nearest_speaker", "second_take"]
    extra = result.info["extra"]
    assert extra["reference_models"] == ["second_take"]
    # test clips have index 0, adaptation used indices 5 (digits 0-4): the take is index 1, same digit
    assert extra["second_takes"]["7_yweweler_0"] == "7_yweweler_1"
    assert math.isnan(result.results["second_take"]["speaker_similarity"].value)  # evaluators off
    assert extra["unscored"]["second_take"]["speaker_similarity"]["count"] == 10
    assert 2.0 < result.results["second_take"]["mcd"].value < 15.0
    assert set(extra["unscored"]) == {"speaker", "lora", "full_finetune", "nearest_speaker", "second_take"}
    assert any(note.startswith("Reference rows, not competitors") for note in result.info["notes"])
    assert result.info["extra"]["checks"] == {
        "disabled_adapter_equals_base": True,
        "reloaded_adapter_equals_trained": True,
    }
    assert result.info["dataset"]["splits"] == {"adaptation": 5, "test": 10}
    assert result.parameters["nearest_speaker"]["trainable"] == 0
    assert result.parameters["full_finetune"]["fraction"] == 1.0
    assert (tmp_path / "mels.png").is_file() and (
        tmp_path / "adapters" / "speaker" / "adapter_model.safetensors"
    ).is_file()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir())[0] == "full_finetune_0_yweweler_0.wav"
    again = create_pipeline("speech/speaker_adaptation", backbone=pipe.backbone, evaluators=False)
    again.load_adapter(tmp_path / "adapters" / "speaker")  # the run's adapter, as lab code reloads it
    tokens = torch.tensor([1, 18, 17, 8, 1])
    assert again.speaker_id == pipe.speaker_id
    assert torch.equal(again.model.synthesize(tokens, 1), pipe.model.eval().synthesize(tokens, 1))


def _quick_pipe(max_steps: int):
    return create_pipeline(
        "speech/speaker_adaptation",
        backbone=_tiny_backbone(),
        train={"max_steps": max_steps, "batch_size": 4, "lr": 1e-2, "schedule": "constant",
               "warmup_ratio": 0.0, "log_every": 1},
        backbone_options={"vocoder": "griffin_lim"},
        data_options={"adaptation_clips": 5, "eval_clips_per_digit": 1, "evaluators": False, "samples": 0,
                      "plot_clips": 1, "vocode_reference": False, "second_take_reference": False},
        compare=[],
    )  # fmt: skip


@pytest.mark.skipif(
    not (MIRROR / "fsdd" / "recordings").is_dir(), reason=f"FSDD is not in the data mirror {MIRROR}"
)
def test_resume_continues_the_losses_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """A 3-step run's checkpoint, resumed to 6 steps, logs the 6 losses of a 6-step run (metrics.jsonl
    continued, not rewritten); lab code's fit on the same clips gives the run's adapter bit for bit."""
    monkeypatch.setenv("PEFT_PIPELINES_DATA", str(MIRROR))
    _quick_pipe(3).run(tmp_path / "interrupted")
    resumed = _quick_pipe(6).run(tmp_path / "interrupted", resume=True)
    straight = _quick_pipe(6).run(tmp_path / "straight")
    losses = {name: [row["loss"] for row in run.histories["speaker"]] for name, run in
              (("resumed", resumed), ("straight", straight))}  # fmt: skip
    assert len(losses["straight"]) == 6 and losses["resumed"] == pytest.approx(losses["straight"], abs=1e-6)
    log = tmp_path / "interrupted" / "train" / "speaker" / "speaker" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert resumed.results["speaker"]["mcd"].value == pytest.approx(straight.results["speaker"]["mcd"].value)
    lab = _quick_pipe(6)
    lab.speaker = 0  # the run's speaker without evaluators
    clips = [u for u in fsdd_utterances() if u.speaker == "yweweler" and u.index >= 5]
    lab.fit(adaptation_clips(clips, 5))
    recipe_model = _tiny_backbone().model
    load_adapter(recipe_model, tmp_path / "straight" / "adapters" / "speaker")
    assert lab.model.state_dict().keys() == recipe_model.state_dict().keys()
    assert all(torch.equal(v, recipe_model.state_dict()[k]) for k, v in lab.model.state_dict().items())


@pytest.mark.skipif(
    not (MIRROR / "fsdd" / "recordings").is_dir(), reason=f"FSDD is not in the data mirror {MIRROR}"
)
def test_base_recipe_records_the_base_training_without_repeating_it(tmp_path, monkeypatch):
    from pipelines.core.training import TrainResult
    from pipelines.speech import base_experiment
    from pipelines.speech.evaluators import Evaluators, UtteranceClassifier
    from pipelines.speech.pipeline import BaseMultispeakerPipeline

    monkeypatch.setenv("PEFT_PIPELINES_DATA", str(MIRROR))
    history = [{"step": 7, "epoch": 1.0, "loss": 0.5}]
    done = TrainResult(7, 1.0, history, None, None, "loss", False, False, 1.5, 0, 10.0, "fp32", None)
    backbone = _tiny_backbone()
    backbone.train_result, backbone.info["training"] = done, {"train_clips": 2250, "wall_time_s": 1.5}
    monkeypatch.setattr(base_experiment, "load_backbone", lambda *args: backbone)
    pipe = BaseMultispeakerPipeline({"vocoder": "griffin_lim"})
    torch.manual_seed(0)
    pipe.session._evaluators = Evaluators(UtteranceClassifier(62, 5), UtteranceClassifier(62, 10), {})
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    result = pipe.run(tmp_path)
    assert list(result.results) == ["base"] and result.results["base"].n_examples == 50
    assert result.histories["base"] == history and result.info["extra"]["models"]["base"]["steps"] == 7
    assert all(torch.equal(v, backbone.model.state_dict()[k]) for k, v in before.items())  # not retrained
    count = sum(p.numel() for p in backbone.model.parameters())
    assert result.parameters["base"] == {"trainable": count, "total": count, "fraction": 1.0}
    assert result.info["dataset"]["splits"] == {"train": 2250, "test_scored": 50}
    assert (tmp_path / "mels.png").is_file() and len(list((tmp_path / "samples").iterdir())) == 2


def _metadata_folder(folder: Path, words) -> Path:
    folder.mkdir()
    lines = []
    for i, word in enumerate(words):
        t = np.arange(int(8000 * 0.4)) / 8000
        wav = np.concatenate([np.zeros(400), 0.5 * np.sin(2 * np.pi * (120 + 10 * i) * t), np.zeros(400)])
        write_wav(folder / f"clip{i}.wav", wav, 8000)
        lines.append(f"clip{i}|{word}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_a_recipe_on_the_built_in_model_reads_a_metadata_csv_speaker_folder(tmp_path):
    """The user's clips (metadata.csv) replace FSDD's; the real recordings get an intelligibility row."""
    train = _metadata_folder(tmp_path / "train", ["one", "two", "three", "one", "hello"])
    test = _metadata_folder(tmp_path / "test", ["one", "two", "nine"])
    raw = yaml.safe_load((RECIPES / "fsdd_speaker_adapter.yaml").read_text())
    raw["data"]["options"] = {}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(
        tmp_path / "r.yaml",
        [
            "stages.0.train.max_steps=3",
            "stages.0.train.batch_size=2",
            "data.options.adaptation_clips=all",
            f"data.options.speaker_folder={train}",
            f"data.options.test_folder={test}",
            "data.options.samples=0",
            "data.options.plot_clips=1",
            "evaluation.bootstrap=20",
            "compare=[nearest_speaker]",
            "backbone.options.vocoder=griffin_lim",
        ],
    )
    pipe = SpeakerAdaptationPipeline.from_recipe(recipe)
    speakers = ["george", "jackson", "lucas", "nicolas", "theo"]
    pipe.backbone = Backbone(tiny_random_model(5), speakers, {"name": "test_tiny", "weights": "random"})
    result = pipe.run(tmp_path / "run")
    assert list(result.results) == ["speaker", "nearest_speaker", "vocoded_recording", "recording"]
    assert result.info["dataset"]["name"] == str(train) and result.info["dataset"]["splits"]["test"] == 3
    assert list(result.results["recording"]) == ["intelligibility"]
    assert math.isfinite(result.results["speaker"]["intelligibility"].value)
