"""The precision policy: which parameters become bf16, on CPU tensors with the CUDA policy forced, and
`train` with `precision: bf16` on the CPU (frozen weights cast, CPU bf16 autocast, float32 checkpoints)."""

from __future__ import annotations

import pydantic
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from pipelines.core.peft import LoRA, add_adapter, set_trainable
from pipelines.core.peft.lora import LoRAAdapter
from pipelines.core.precision import apply_precision_policy, policy_notes, resolve_policy
from pipelines.core.training import TrainConfig, train

torch.set_num_threads(1)


class Classifier(nn.Module):
    """A 2-layer LLaMA (tied embeddings) with a linear head on the mean hidden state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        )  # fmt: skip
        self.lm = transformers.LlamaForCausalLM(config)
        self.head = nn.Linear(32, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lm.model(input_ids=ids).last_hidden_state.mean(1))


def adapted(name: str = "task", targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Classifier:
    model = Classifier()
    model.requires_grad_(False)
    add_adapter(model, LoRA(r=4, alpha=8, targets=list(targets)), name=name)
    set_trainable(model, [name], extra=["head"])
    return model


def dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters()}


def test_cuda_policy_casts_frozen_layer_weights_and_keeps_norms_adapters_and_head_float32():
    model = adapted()
    report = apply_precision_policy(model, device_type="cuda", precision="auto")
    kinds = dtypes(model)
    layer = "lm.model.layers.0."
    assert kinds[layer + "self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert kinds[layer + "self_attn.k_proj.weight"] == torch.bfloat16  # not adapted, frozen
    assert kinds[layer + "mlp.down_proj.weight"] == torch.bfloat16
    assert kinds["lm.model.embed_tokens.weight"] == torch.bfloat16
    assert kinds[layer + "input_layernorm.weight"] == torch.float32  # RMSNorm: autocast keeps norms fp32
    assert kinds["lm.model.norm.weight"] == torch.float32
    assert kinds[layer + "self_attn.q_proj.adapters.task.lora_A.weight"] == torch.float32
    assert kinds["head.weight"] == kinds["head.bias"] == torch.float32
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight  # still tied, one tensor
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    bf16 = [name for name, kind in kinds.items() if kind == torch.bfloat16]
    assert set(bf16) == {name for name in frozen if "norm" not in name}
    # 2 layers x 7 projections + the tied embedding
    assert report == {
        "compute_dtype": "bfloat16", "frozen_dtype": "bfloat16", "trainable_dtype": "float32",
        "cast_parameters": 15, "cast_elements": sum(model.get_parameter(n).numel() for n in bf16),
        "restored_parameters": 0,
    }  # fmt: skip
    assert apply_precision_policy(model, device_type="cuda") == report  # idempotent
    assert dtypes(model) == kinds
    model.float()  # the user undoes the cast: the next run casts again
    assert apply_precision_policy(model, device_type="cuda") == report and dtypes(model) == kinds


@pytest.mark.parametrize(
    ("device_type", "precision", "frozen_dtype"),
    [
        ("cpu", "auto", "auto"),
        ("cuda", "fp32", "auto"),
        ("cuda", "auto", "float32"),
        ("cpu", "bf16", "float32"),
    ],
)
def test_policies_that_keep_every_parameter_float32(device_type, precision, frozen_dtype):
    model = adapted()
    report = apply_precision_policy(model, device_type, precision, frozen_dtype)
    assert set(dtypes(model).values()) == {torch.float32}
    assert report["cast_parameters"] == 0 and report["frozen_dtype"] == "float32"
    assert report["compute_dtype"] == ("float32" if precision == "fp32" or device_type == "cpu" and
                                       precision == "auto" else "bfloat16")  # fmt: skip
    assert policy_notes(report) == []


def test_float32_policy_after_a_bf16_one_restores_the_cast_weights():
    model = adapted()
    apply_precision_policy(model, "cuda")
    report = apply_precision_policy(model, "cpu")
    assert set(dtypes(model).values()) == {torch.float32}
    assert report["restored_parameters"] == 15 and report["cast_parameters"] == 0
    assert "float32 again" in policy_notes(report)[0]


def test_stage_two_keeps_the_frozen_stage_one_adapter_and_head_float32_and_restores_what_now_trains():
    model = adapted("domain")
    apply_precision_policy(model, "cuda")
    add_adapter(model, LoRA(r=2, targets=["q_proj"]), name="task")
    set_trainable(model, ["task"])  # the domain adapter and the head are frozen now
    model.lm.model.layers[1].mlp.down_proj.requires_grad_(True)  # cast while frozen, trained now
    report = apply_precision_policy(model, "cuda")
    kinds = dtypes(model)
    assert kinds["lm.model.layers.0.self_attn.q_proj.adapters.domain.lora_B.weight"] == torch.float32
    assert kinds["head.weight"] == torch.float32  # trained in stage 1: never cast, saved in float32
    assert kinds["lm.model.layers.1.mlp.down_proj.weight"] == torch.float32
    assert report["restored_parameters"] == 1 and report["cast_parameters"] == 14


def test_conflicting_precision_settings_are_refused():
    with pytest.raises(pydantic.ValidationError, match="frozen_dtype bfloat16 needs bf16 compute"):
        TrainConfig(precision="fp32", frozen_dtype="bfloat16")
    with pytest.raises(ValueError, match="precision auto computes in float32 on cpu"):
        resolve_policy("cpu", "auto", "bfloat16")
    assert resolve_policy("cpu", "bf16", "bfloat16").frozen_dtype == torch.bfloat16


def test_a_cast_model_runs_outside_train_under_bf16_autocast_and_restores_the_autocast_state():
    model = adapted()
    ids = torch.randint(0, 64, (2, 6))
    expected = model(ids)
    apply_precision_policy(model, "cpu", "bf16")
    with torch.no_grad():
        got = model(ids)  # float32 activations meet bf16 weights: the hooks enter autocast
        lm = model.lm(input_ids=ids).logits  # a submodule called on its own enters it too
    assert got.dtype == lm.dtype == torch.bfloat16  # computed as in training
    assert not torch.is_autocast_enabled("cpu")
    torch.testing.assert_close(got.float(), expected.detach(), atol=0.05, rtol=0.05)
    with pytest.raises(IndexError):
        model(torch.full((1, 3), 99))  # an error inside forward leaves autocast as it found it
    assert not torch.is_autocast_enabled("cpu")


class TurnsAutocastOff(nn.Module):
    """A layer whose forward turns autocast off around a sub-layer (as some do for precision)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return self.inner(x)


def test_inside_a_call_the_hooks_obey_code_that_turns_autocast_off():
    model = TurnsAutocastOff().requires_grad_(False)
    apply_precision_policy(model, "cpu", "bf16")
    with pytest.raises(RuntimeError, match="dtype"):  # float32 into a bf16 Linear, autocast off: as asked
        model(torch.randn(2, 4))
    assert not torch.is_autocast_enabled("cpu")
    assert model.inner(torch.randn(2, 4)).dtype == torch.bfloat16  # called on its own: the hooks enter


def test_autocast_left_on_by_an_interrupted_forward_is_undone_by_the_next_call():
    model = adapted()
    apply_precision_policy(model, "cpu", "bf16")
    original = LoRAAdapter.fused_forward

    def interrupt(self, base, x, stack=()):
        raise KeyboardInterrupt

    LoRAAdapter.fused_forward = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):  # not an Exception: forward hooks do not run
            model(torch.randint(0, 64, (1, 4)))
    finally:
        LoRAAdapter.fused_forward = original
    assert torch.is_autocast_enabled("cpu")
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 4)))
    assert not torch.is_autocast_enabled("cpu")


class Tokens(Dataset):
    def __init__(self, n: int = 16) -> None:
        generator = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 64, (n, 6), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.ids[index], self.labels[index]


def test_train_with_bf16_on_the_cpu_casts_frozen_weights_and_checkpoints_float32_trainables(tmp_path):
    seen = []

    def loss_fn(model, batch):
        ids, labels = batch
        seen.append((torch.is_autocast_enabled("cpu"), model.lm.model.layers[0].self_attn.k_proj(
            torch.ones(1, 32)).dtype))  # fmt: skip
        return nn.functional.cross_entropy(model(ids).float(), labels)

    model = adapted()
    config = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, precision="bf16", checkpoint_every=3)
    result = train(model, Tokens(), loss_fn, config, run_dir=tmp_path, progress=False)
    assert seen == [(True, torch.bfloat16)] * 3
    assert result.precision == "bf16"
    assert result.precision_policy["cast_parameters"] == 15
    assert result.precision_policy["trainable_dtype"] == "float32"
    assert any(note.startswith("precision: compute in bfloat16, 15 frozen") for note in result.notes)
    assert model.lm.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    saved = load_file(tmp_path / "checkpoints" / "last" / "model.safetensors")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and {t.dtype for t in saved.values()} == {torch.float32}
    resumed = adapted()
    again = train(resumed, Tokens(), loss_fn, config.model_copy(update={"max_steps": 4}), run_dir=tmp_path,
                  resume=True, progress=False)  # fmt: skip
    assert again.steps == 4 and resumed.head.weight.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_trains_a_bf16_backbone_on_the_fused_path_and_predicts_after(tmp_path, monkeypatch):
    calls = []
    fused = LoRAAdapter.fused_forward
    monkeypatch.setattr(
        LoRAAdapter,
        "fused_forward",
        lambda self, base, x, stack=(): calls.append(x.dtype) or fused(self, base, x, stack),
    )

    def loss_fn(model, batch):
        ids, labels = batch
        return nn.functional.cross_entropy(model(ids).float(), labels)

    model = adapted().cuda()
    config = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, checkpoint_every=3)  # precision auto
    result = train(model, Tokens(), loss_fn, config, run_dir=tmp_path, progress=False)
    assert result.precision == "bf16" and result.precision_policy["cast_parameters"] == 15
    assert (
        len(calls) == 3 * 4 and model.lm.model.embed_tokens.weight.dtype == torch.bfloat16
    )  # 2 layers x q, v
    with torch.no_grad():
        scores = model(Tokens().ids[:4].cuda())  # outside train: the hooks enter bf16 autocast
    assert scores.dtype == torch.bfloat16 and torch.isfinite(scores.float()).all()
    saved = load_file(tmp_path / "checkpoints" / "last" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_a_deep_copy_of_a_cast_model_keeps_running_outside_train():
    import copy

    model = adapted()
    apply_precision_policy(model, "cpu", "bf16")
    twin = copy.deepcopy(model)  # drops the parameters' markers, keeps the hooks
    report = apply_precision_policy(twin, "cpu", "bf16")
    assert report["cast_parameters"] == 15  # held in bf16 (already, not by this call)
    with torch.no_grad():
        assert twin(torch.randint(0, 64, (2, 5))).dtype == torch.bfloat16
