"""transformers TTS backbones (SpeechT5, FastSpeech2Conformer) on tiny random configurations: adapter
placement, exact identity at init and when disabled, one step of the model's own loss, adapter files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.core.peft import LoRA, add_adapter, disable_adapters, load_adapter, save_adapter, wrappers
from pipelines.core.recipe import load_recipe
from pipelines.core.training import TrainConfig
from pipelines.speech.audio import write_wav
from pipelines.speech.data import folder_utterances
from pipelines.speech.hf_adaptation import adapt_hf, default_hf_adapter, hf_examples
from pipelines.speech.hf_features import HfExample
from pipelines.speech.hf_tts import load_hf_tts, tiny_hf_tts

MIRROR = Path(os.environ.get("PEFT_PIPELINES_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "speech"
IDS = torch.tensor([5, 9, 12, 7, 3, 20])
EXPECTED = {
    "speecht5": [
        "speecht5.encoder.wrapped_encoder.layers.0.feed_forward.output_dense",
        "speecht5.encoder.wrapped_encoder.layers.1.feed_forward.output_dense",
        "speecht5.decoder.wrapped_decoder.layers.0.feed_forward.output_dense",
    ],
    "fastspeech2_conformer": [
        "encoder.conformer_layers.0.feed_forward.conv2",
        *(f"{p}_predictor.conv_layers.{i}.conv" for p in ("duration", "pitch", "energy") for i in (0, 1)),
        "decoder.conformer_layers.0.feed_forward.conv2",
    ],
}


def _synthetic(family: str, count: int = 2) -> list[HfExample]:
    generator = torch.Generator().manual_seed(1)
    examples = []
    for i in range(count):
        ids = IDS[: 5 + i]
        frames = 12 + 2 * i
        durations = torch.full((len(ids),), frames // len(ids))
        durations[0] += frames - int(durations.sum())
        example = HfExample(ids, torch.randn(frames, 8, generator=generator) - 2.0)
        if family == "fastspeech2_conformer":
            example.durations = durations
            example.pitch, example.energy = torch.randn(len(ids), generator=generator), torch.randn(len(ids))
        examples.append(example)
    return examples


@pytest.mark.parametrize("family", ["speecht5", "fastspeech2_conformer"])
def test_adapters_inject_where_intended_and_start_as_identity(family):
    base = tiny_hf_tts(family)
    adapted = base.copy()
    add_adapter(adapted.model, default_hf_adapter(family, hidden=4), name="speaker")
    assert [name for name, _ in wrappers(adapted.model)] == EXPECTED[family]
    assert torch.equal(adapted.synthesize_mel(IDS), base.synthesize_mel(IDS))
    lora = base.copy()
    add_adapter(lora.model, LoRA(r=2, targets=list(default_hf_adapter(family).targets)), name="speaker")
    assert [name for name, _ in wrappers(lora.model)] == EXPECTED[family]
    with pytest.raises(ValueError, match="no adaptation clips"):
        adapt_hf(base, "lora", [], TrainConfig(max_steps=1))


@pytest.mark.parametrize("family", ["speecht5", "fastspeech2_conformer"])
def test_one_step_of_the_model_loss_changes_only_the_adapter(family, tmp_path):
    base = tiny_hf_tts(family)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    config = TrainConfig(max_steps=2, batch_size=2, lr=5e-2, schedule="constant", log_every=1)
    adapted = adapt_hf(base, "adapter", _synthetic(family), config, default_hf_adapter(family, 4), "speaker")
    losses = [row["loss"] for row in adapted.result.history if "loss" in row]
    assert len(losses) == 2 and all(np.isfinite(losses))
    after = {k.replace(".base_layer", ""): v for k, v in adapted.model.model.state_dict().items()}
    changed = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    assert changed and all(".adapters.speaker." in k for k in changed)
    assert any(k.endswith("up.weight") for k in changed)
    assert all(torch.equal(base.model.state_dict()[k], v) for k, v in before.items())  # the base is a copy
    trained = adapted.model.synthesize_mel(IDS)
    assert not torch.equal(trained, base.synthesize_mel(IDS)) or family == "speecht5" and len(trained) < 4
    with disable_adapters(adapted.model.model):
        assert torch.equal(adapted.model.synthesize_mel(IDS), base.synthesize_mel(IDS))
    save_adapter(adapted.model.model, tmp_path / "adapter", name="speaker")
    reloaded = base.copy()
    load_adapter(reloaded.model, tmp_path / "adapter")
    assert torch.equal(reloaded.synthesize_mel(IDS), trained)


def test_speecht5_teacher_forced_mels_identical_when_disabled():
    """SpeechT5 may stop after a frame or two when random: compare full teacher-forced outputs too."""
    base = tiny_hf_tts("speecht5")
    config = TrainConfig(max_steps=1, batch_size=2, lr=5e-2, warmup_ratio=0.0)
    adapted = adapt_hf(
        base, "adapter", _synthetic("speecht5"), config, default_hf_adapter("speecht5", 4), "s"
    )

    def forward(model):
        torch.manual_seed(0)
        out = model.model(
            IDS[None], decoder_input_values=torch.zeros(1, 6, 8), speaker_embeddings=model._speakers(1)
        )
        return out.spectrogram

    assert not torch.equal(forward(adapted.model), forward(base))
    with disable_adapters(adapted.model.model):
        assert torch.equal(forward(adapted.model), forward(base))


def test_local_folder_loads_and_missing_weights_say_what_to_do(tmp_path):
    tiny = tiny_hf_tts("fastspeech2_conformer")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.vocoder[0].save_pretrained(tmp_path / "vocoder")
    loaded = load_hf_tts(str(tmp_path / "model"), vocoder=str(tmp_path / "vocoder"), local_files_only=True)
    assert loaded.family == "fastspeech2_conformer" and "local folder" in loaded.info["weights"]
    assert torch.equal(loaded.synthesize_mel(IDS), tiny.synthesize_mel(IDS))
    mel = tiny.synthesize_mel(IDS)
    assert np.array_equal(loaded.vocode(mel), tiny.vocode(mel))
    with pytest.raises(FileNotFoundError, match="needs the weights of nobody/no_such_tts: run online once"):
        load_hf_tts("hf:nobody/no_such_tts", local_files_only=True)


def test_fastspeech2_targets_from_wavs_split_the_voiced_span(tmp_path):
    for i, (word, f0) in enumerate([("one", 120), ("six", 180)]):
        t = np.arange(int(8000 * 0.3)) / 8000
        wav = np.concatenate([np.zeros(800), 0.5 * np.sin(2 * np.pi * f0 * t)])
        write_wav(tmp_path / f"c{i}.wav", wav, 8000)
        (tmp_path / f"c{i}.txt").write_text(word, encoding="utf-8")
    tts = tiny_hf_tts("fastspeech2_conformer")
    examples = hf_examples(tts, folder_utterances(tmp_path))
    first = examples[0]  # 0.1 s of silence (8 frames at hop 256, 22,050 Hz), then 0.3 s of tone
    assert first.mel.shape == (1 + len(tts_wav := first.extra["wav"]) // 256, 8) and len(tts_wav) == 8820
    assert first.durations.tolist() == [8 + 9, 9, 9, 0] and int(first.durations.sum()) == len(first.mel)
    voiced = torch.cat([e.pitch[e.extra["voiced"]] for e in examples])
    assert abs(float(voiced.mean())) < 1e-5 and float(first.pitch[-1]) == 0.0  # <sos/eos>: unvoiced
    assert float(examples[1].pitch[0]) > float(first.pitch[0])  # 180 Hz above 120 Hz


def test_shipped_transformers_recipes_route_to_the_hf_pipeline():
    from pipelines.speech.hf_pipeline import HfSpeakerAdaptationPipeline
    from pipelines.speech.pipeline import SpeakerAdaptationPipeline

    for name, family in (("speecht5", "speecht5"), ("fastspeech2_conformer", "fastspeech2_conformer")):
        recipe = load_recipe(RECIPES / f"{name}_speaker_adapter.yaml")
        pipe = SpeakerAdaptationPipeline.from_recipe(recipe)
        assert isinstance(pipe, HfSpeakerAdaptationPipeline) and pipe.compare == ["lora", "base"]
        assert list(pipe.adapter.targets) == list(default_hf_adapter(family).targets)
    sweep = load_recipe(RECIPES / "fsdd_speaker_adapter_sweep.yaml")
    assert sweep.data.options["sweep_clips"] == [1, 5, 20, "all"]


@pytest.mark.skipif(
    not (MIRROR / "fsdd" / "recordings").is_dir(), reason=f"FSDD is not in the data mirror {MIRROR}"
)
def test_recipe_path_runs_on_a_tiny_fastspeech2_with_fsdd(tmp_path, monkeypatch):
    from pipelines.speech.pipeline import SpeakerAdaptationPipeline

    monkeypatch.setenv("PEFT_PIPELINES_DATA", str(MIRROR))
    recipe = load_recipe(
        RECIPES / "fastspeech2_conformer_speaker_adapter.yaml",
        [
            "backbone.name=test_tiny_fastspeech2_conformer",
            "stages.0.train.max_steps=3",
            "stages.0.adapter.hidden=4",
            "data.options.adaptation_clips=3",
            "data.options.eval_clips_per_digit=1",
            "data.options.sweep_clips=[1]",
            "evaluation.bootstrap=20",
            "compare=[lora, nearest_speaker, {method: lora, r: 2}]",
        ],
    )
    pipe = SpeakerAdaptationPipeline.from_recipe(recipe)
    result = pipe.run(tmp_path)
    again = SpeakerAdaptationPipeline.from_recipe(recipe)
    again.load_adapter(tmp_path / "adapters" / "speaker")  # the run's adapter and input statistics
    ids = again.backbone().tokenize("seven")
    assert again.statistics == pipe.statistics  # the same floats after the JSON
    assert torch.equal(again.model.synthesize_mel(ids, 0), pipe.model.eval().synthesize_mel(ids, 0))
    assert list(result.results) == ["speaker", "lora", "base", "lora_r2"]  # nearest_speaker: the base
    assert result.info["extra"]["checks"] == {
        "disabled_adapter_equals_base": True,
        "reloaded_adapter_equals_trained": True,
    }
    assert result.info["dataset"]["splits"] == {"adaptation": 3, "test": 10}
    assert result.parameters["base"]["trainable"] == 0 and list(
        result.info["extra"]["sweep_adaptation_clips"]
    ) == ["1"]
    assert result.info["extra"]["models"]["lora_r2"]["steps"] == 3
    assert result.parameters["lora_r2"]["trainable"] < result.parameters["lora"]["trainable"]
    # the run's adapter files name the transformers model's own modules (as lab code's save_adapter)
    for folder in (tmp_path / "adapters" / "speaker", tmp_path / "baselines" / "adapters" / "lora" / "lora"):
        model = tiny_hf_tts("fastspeech2_conformer").model
        load_adapter(model, folder)
        assert [path for path, _ in wrappers(model)] == EXPECTED["fastspeech2_conformer"]
