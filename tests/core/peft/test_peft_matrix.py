"""Every method on every layer type it supports: identity at init, gradients, merge, disable, files."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft_testing import base_snapshot, is_adapter_name, perturb_adapters, relative_error, weighted_loss
from torch import nn

from pipelines.core.peft import (
    IA3,
    SCT,
    SSF,
    BitFit,
    Bottleneck,
    LoHa,
    LoKr,
    LoRA,
    NormTuning,
    PromptTuning,
    VeRA,
    add_adapter,
    disable_adapters,
    load_adapter,
    merge,
    save_adapter,
    unmerge,
)


def llama_rms_norm(channels: int) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


def affine_norm(norm: nn.Module) -> nn.Module:
    """A norm layer whose affine parameters are not the trivial ones and BatchNorm statistics non-zero."""
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.uniform_(0.5, 1.5)
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 1.5)
    return norm


def tokens() -> torch.Tensor:
    return torch.randn(2, 5, 6)


def image(channels: int = 4) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(2, channels, 5, 5)


@dataclass
class Case:
    id: str
    layer: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    spec: object
    mergeable: bool = True
    identity: bool = True


LINEAR = lambda: nn.Linear(6, 7)  # noqa: E731
CONV2D = lambda: nn.Conv2d(4, 6, 3, padding=1)  # noqa: E731
CASES = [
    Case("lora-linear", LINEAR, tokens, LoRA(r=2, targets=["layer"])),
    Case("lora-embedding", lambda: nn.Embedding(11, 6), lambda: torch.randint(0, 11, (2, 5)),
         LoRA(r=2, targets=["layer"])),
    Case("lora-conv1d", lambda: nn.Conv1d(3, 5, 3, padding=1, stride=2), lambda: torch.randn(2, 3, 9),
         LoRA(r=2, targets=["layer"])),
    Case("lora-conv2d", CONV2D, image(), LoRA(r=2, targets=["layer"])),
    Case("lora-conv3d", lambda: nn.Conv3d(2, 3, 3, padding=1), lambda: torch.randn(1, 2, 4, 4, 4),
         LoRA(r=2, targets=["layer"])),
    Case("lora-conv2d-groups2", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), image(),
         LoRA(r=2, targets=["layer"])),
    Case("lora-convtranspose1d", lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1),
         lambda: torch.randn(2, 3, 6), LoRA(r=2, targets=["layer"])),
    Case("lora-gaussian-linear", LINEAR, tokens, LoRA(r=2, init="gaussian", targets=["layer"])),
    Case("lora-dropout-linear", LINEAR, tokens, LoRA(r=2, dropout=0.5, targets=["layer"])),
    Case("dora-linear", LINEAR, tokens, LoRA(r=2, use_dora=True, targets=["layer"])),
    Case("rslora-linear", LINEAR, tokens, LoRA(r=4, alpha=4, use_rslora=True, targets=["layer"])),
    Case("rslora-conv2d", CONV2D, image(), LoRA(r=4, alpha=4, use_rslora=True, targets=["layer"])),
    Case("bottleneck-serial-linear", LINEAR, tokens, Bottleneck(hidden=3, targets=["layer"]), False),
    Case("bottleneck-parallel-linear", LINEAR, tokens,
         Bottleneck(hidden=3, placement="parallel", activation="relu", targets=["layer"]), False),
    Case("bottleneck-serial-conv2d", CONV2D, image(), Bottleneck(reduction=2, targets=["layer"]), False),
    Case("bottleneck-parallel-conv2d", CONV2D, image(),
         Bottleneck(hidden=2, placement="parallel", activation="silu", scale=0.5, targets=["layer"]), False),
    Case("ia3-linear", LINEAR, tokens, IA3(targets=["layer"])),
    Case("ia3-conv2d", CONV2D, image(), IA3(targets=["layer"])),
    Case("ssf-linear", LINEAR, tokens, SSF(targets=["layer"])),
    Case("ssf-conv2d", CONV2D, image(), SSF(targets=["layer"])),
    Case("ssf-layernorm", lambda: affine_norm(nn.LayerNorm(6)), tokens, SSF(targets=["layer"])),
    Case("bitfit-linear", LINEAR, tokens, BitFit(targets=["layer"])),
    Case("bitfit-conv2d", CONV2D, image(), BitFit(targets=["layer"])),
    Case("norm-batchnorm2d", lambda: affine_norm(nn.BatchNorm2d(4)), image(), NormTuning()),
    Case("norm-layernorm", lambda: affine_norm(nn.LayerNorm(6)), tokens, NormTuning()),
    Case("norm-groupnorm", lambda: affine_norm(nn.GroupNorm(2, 4)), image(), NormTuning()),
    Case("norm-rmsnorm", lambda: affine_norm(nn.RMSNorm(6)), tokens, NormTuning()),
    Case("norm-llama-rmsnorm", lambda: llama_rms_norm(6), tokens, NormTuning(targets=["layer"])),
    Case("prompt-embedding", lambda: nn.Embedding(11, 6), lambda: torch.randint(0, 11, (2, 5)),
         PromptTuning(num_tokens=2, insert_at=1, targets=["layer"]), False, False),
    Case("loha-linear", LINEAR, tokens, LoHa(r=2, alpha=3, targets=["layer"])),
    Case("loha-conv1d", lambda: nn.Conv1d(3, 5, 3, padding=1, stride=2), lambda: torch.randn(2, 3, 9),
         LoHa(r=2, targets=["layer"])),
    Case("loha-conv2d", CONV2D, image(), LoHa(r=2, targets=["layer"])),
    Case("loha-effective-conv2d", CONV2D, image(), LoHa(r=2, use_effective_conv2d=True, targets=["layer"])),
    Case("loha-effective-conv1d", lambda: nn.Conv1d(3, 5, 3, padding=1), lambda: torch.randn(2, 3, 9),
         LoHa(r=2, use_effective_conv2d=True, targets=["layer"])),
    Case("loha-conv2d-groups2", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), image(),
         LoHa(r=2, targets=["layer"])),
    Case("lokr-linear", LINEAR, tokens, LoKr(r=2, alpha=3, targets=["layer"])),
    Case("lokr-both-linear", lambda: nn.Linear(16, 12), lambda: torch.randn(2, 5, 16),
         LoKr(r=1, decompose_both=True, targets=["layer"])),
    Case("lokr-conv2d", CONV2D, image(), LoKr(r=2, targets=["layer"])),
    Case("lokr-lowrank-conv2d", CONV2D, image(), LoKr(r=1, targets=["layer"])),
    Case("lokr-effective-conv2d", CONV2D, image(), LoKr(r=1, use_effective_conv2d=True, targets=["layer"])),
    Case("lokr-conv2d-groups2", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), image(),
         LoKr(r=1, targets=["layer"])),
    Case("vera-linear", LINEAR, tokens, VeRA(r=4, targets=["layer"])),
    Case("vera-dropout-linear", LINEAR, tokens, VeRA(r=4, dropout=0.5, targets=["layer"])),
    Case("sct-linear", LINEAR, tokens, SCT(top_k=3, targets=["layer"], selected={"layer": [0, 2, 5]})),
    Case("sct-conv2d", CONV2D, image(),
         SCT(top_k=2, scale=0.5, targets=["layer"], selected={"layer": [1, 4]})),
    Case("sct-nobias-linear", lambda: nn.Linear(6, 7, bias=False), tokens,
         SCT(fraction=0.5, bias=False, targets=["layer"], selected={"layer": [0, 1, 3, 6]})),
    Case("sct-layernorm", lambda: affine_norm(nn.LayerNorm(6)), tokens,
         SCT(top_k=2, targets=["layer"], selected={"layer": [2, 3]}), False),
]  # fmt: skip


def build(case: Case) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base model, adapted model, input); the adapted model is a copy of the base, in eval mode."""
    base = nn.Sequential(OrderedDict(layer=case.layer())).eval()
    model = add_adapter(copy.deepcopy(base), case.spec, name="task")
    return base, model, case.inputs()


def trained(case: Case) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """As build, with perturbed adapter weights and one train-mode forward (BatchNorm updates its stats)."""
    base, model, x = build(case)
    perturb_adapters(model)
    model.train()
    with torch.no_grad():
        model(x)
    return base, model.eval(), x


@pytest.mark.parametrize("case", [c for c in CASES if c.identity], ids=[c.id for c in CASES if c.identity])
def test_identity_at_init(case):
    base, model, x = build(case)
    assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradients_reach_only_the_adapter(case):
    _, model, x = build(case)
    model.train()
    weighted_loss(model(x)).backward()
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    adapter = [n for n, _ in model.named_parameters() if is_adapter_name(n)]
    assert adapter and names == adapter
    assert all(p.requires_grad == is_adapter_name(n) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", [c for c in CASES if c.mergeable], ids=[c.id for c in CASES if c.mergeable])
def test_merge_matches_unmerged_and_unmerge_restores_base(case):
    _, model, x = trained(case)
    before = base_snapshot(model)
    expected = model(x)
    merge(model)
    assert all(adapter.merged for adapter in model.layer.adapters.values())
    assert relative_error(model(x), expected) < 1e-5
    changed = [k for k, v in base_snapshot(model).items() if not torch.equal(v, before[k])]
    assert changed  # the merge really went into the base weights
    unmerge(model)
    for key, value in base_snapshot(model).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0, msg=key)
    assert relative_error(model(x), expected) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_disable_adapters_gives_the_base_output(case):
    base, model, x = trained(case)
    if case.identity:
        assert not torch.equal(model(x), base(x))
    with disable_adapters(model):
        assert torch.equal(model(x), base(x))
    assert model(x).shape != base(x).shape or not torch.equal(model(x), base(x))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_native_save_load_reproduces_outputs(case, tmp_path):
    base, model, x = trained(case)
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path) == "task"
    assert torch.equal(fresh(x), model(x))


def test_batchnorm_train_mode_updates_only_the_adapter_statistics():
    norm = affine_norm(nn.BatchNorm2d(4))
    model = add_adapter(nn.Sequential(OrderedDict(layer=norm)), NormTuning())
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    adapter = model.layer.adapters["default"]
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    model.train()
    model(x)
    model(x)
    assert all(torch.equal(v, before[k]) for k, v in norm.state_dict().items())
    expected_mean = before["running_mean"]
    for _ in range(2):
        expected_mean = 0.9 * expected_mean + 0.1 * x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(adapter.running_mean, expected_mean)
    assert adapter.num_batches_tracked.item() == 2
    model.eval()  # eval mode normalises with the adapter's statistics, the base layer with its own
    reference = nn.functional.batch_norm(
        x, adapter.running_mean, adapter.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
    )
    torch.testing.assert_close(model(x), reference)
    with disable_adapters(model):
        assert torch.equal(model(x), norm(x))
