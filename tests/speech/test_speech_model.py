"""The acoustic model with adapters: training, exact disabling, adapter files, frozen base."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from pipelines.core.peft import (
    Bottleneck,
    add_adapter,
    disable_adapters,
    load_adapter,
    save_adapter,
    wrappers,
)
from pipelines.core.recipe import load_recipe
from pipelines.core.training import TrainConfig
from pipelines.speech.adaptation import adapt, adaptation_clips
from pipelines.speech.backbones import tiny_random_model
from pipelines.speech.data import Example, Utterance, collate_examples, text_to_ids
from pipelines.speech.model import adapter_targets, length_regulate

RECIPES = Path(__file__).resolve().parents[2] / "pipelines" / "recipes" / "speech"


def _examples(count: int = 4) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        tokens = text_to_ids(["one", "two", "six", "nine"][i % 4])
        durations = torch.tensor([1, 3, 2, 3, 1])
        mel = torch.randn(int(durations.sum()), 80, generator=generator) - 5.0
        out.append(Example(tokens, durations, mel, 0, Utterance(Path(f"{i}.wav"), "x", "target", i % 10, 5)))
    return out


def test_length_regulator_repeats_tokens_and_marks_positions():
    hidden = torch.arange(6.0).reshape(1, 3, 2)
    frames, features, lengths = length_regulate(hidden, torch.tensor([[2, 0, 1]]))
    assert lengths.tolist() == [3]
    assert frames[0].tolist() == [[0.0, 1.0], [0.0, 1.0], [4.0, 5.0]]
    assert features[0, :, 0].tolist() == [0.0, 0.5, 0.0]


def test_adapter_trains_leaves_the_base_alone_and_disables_bit_for_bit(tmp_path):
    base = tiny_random_model(num_speakers=2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    examples = _examples()
    spec = Bottleneck(targets=adapter_targets(), hidden=4)
    config = TrainConfig(max_steps=40, batch_size=4, lr=1e-2, log_every=5)
    adapted = adapt(base, "adapter", examples, 1, config, spec, name="speaker")
    losses = [row["loss"] for row in adapted.result.history if "loss" in row]
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert adapted.parameters.trainable == 3 * (16 * 4 + 4 + 4 * 16 + 16)  # three proj layers, hidden 4
    batch = collate_examples(examples)
    inputs = (batch["tokens"], batch["token_lengths"], batch["speakers"])
    with torch.no_grad():
        reference = base(*inputs)["mels"]
        with disable_adapters(adapted.model):
            disabled = adapted.model(*inputs)["mels"]
        trained = adapted.model(*inputs)["mels"]
    assert torch.equal(disabled, reference)
    assert not torch.equal(trained, reference)
    save_adapter(adapted.model, tmp_path / "speaker", name="speaker")
    reloaded = copy.deepcopy(base)
    assert load_adapter(reloaded, tmp_path / "speaker") == "speaker"
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(*inputs)["mels"], trained)


def test_baselines_train_what_they_should():
    base = tiny_random_model(num_speakers=2)
    config = TrainConfig(max_steps=2, batch_size=2, lr=1e-3)
    total = sum(p.numel() for p in base.parameters())
    full = adapt(base, "full_finetune", _examples(), 0, config)
    assert full.parameters.trainable == total
    lora = adapt(base, "lora", _examples(), 0, config, lora_rank=2)
    assert lora.parameters.trainable == 3 * 2 * (16 + 16)
    nearest = adapt(base, "nearest_speaker", _examples(), 0, config)
    assert nearest.parameters.trainable == 0 and nearest.result is None


def test_adaptation_clips_go_round_robin_over_digits():
    clips = [Utterance(Path(f"{d}_x_{i}.wav"), "x", "x", d, i) for d in range(10) for i in range(5, 8)]
    chosen = adaptation_clips(clips, 12)
    assert [(u.digit, u.index) for u in chosen[:3]] == [(0, 5), (1, 5), (2, 5)]
    assert (chosen[10].digit, chosen[10].index) == (0, 6)
    assert len(adaptation_clips(clips, "all")) == 30


def test_synthesis_gives_each_character_a_frame():
    model = tiny_random_model()
    mel = model.synthesize(text_to_ids("seven"), 0)
    assert mel.shape[1] == 80 and mel.shape[0] >= 5


def test_the_vera_recipe_adapts_every_projection_with_one_shared_frozen_pair():
    spec = load_recipe(RECIPES / "fsdd_speaker_vera.yaml").stages[0].adapter
    model = tiny_random_model(5)
    tokens, lengths, speakers = torch.tensor([[1, 18, 17, 8, 1]]), torch.tensor([5]), torch.tensor([1])
    before = model.eval()(tokens, lengths, speakers)["mels"]
    add_adapter(model, spec, name="speaker")
    layers = dict(wrappers(model))
    assert list(layers) == [
        "encoder.blocks.0.proj",
        "duration_predictor.blocks.0.proj",
        "decoder.blocks.0.proj",
    ]
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"{path}.adapters.speaker.vera_lambda_{v}" for path in layers for v in "bd"}
    assert sum(trainable.values()) == 3 * (16 + spec.r)  # b: the tiny model's 16 channels, d: rank r
    shared = {id(layer.adapters["speaker"].projections) for layer in layers.values()}
    assert len(shared) == 1  # one A and B for all layers
    assert torch.equal(model(tokens, lengths, speakers)["mels"], before)  # b = 0: the base at first
    with torch.no_grad():
        for layer in layers.values():
            layer.adapters["speaker"].vera_lambda_b.fill_(0.5)
    assert not torch.equal(model(tokens, lengths, speakers)["mels"], before)
    with disable_adapters(model):
        assert torch.equal(model(tokens, lengths, speakers)["mels"], before)
