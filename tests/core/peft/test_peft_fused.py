"""The fused LoRA Linear path against the plain autograd path: values, gradients, the cast cache."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from peft_testing import perturb_adapters, relative_error
from torch import nn

from pipelines.core.peft import LoRA, add_adapter
from pipelines.core.peft.lora import LoRAAdapter

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


def lora_linear(dtype: torch.dtype = torch.float32, device: str = "cpu", **options) -> nn.Module:
    model = nn.Sequential(OrderedDict(proj=nn.Linear(16, 12))).to(dtype=dtype, device=device)
    add_adapter(model, LoRA(r=4, alpha=8, targets=["proj"], **options))
    perturb_adapters(model, scale=0.3)
    return model


def plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The LoRA Linear as a chain of F.linear, adapter weights cast to the activation dtype."""
    layer = model.proj
    adapter = layer.adapters["default"]
    a, b = adapter.lora_A.weight, adapter.lora_B.weight
    base = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    return base + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * adapter.scaling


def gradients(fn, model: nn.Module, x: torch.Tensor, inplace: bool = False) -> list[torch.Tensor]:
    """(output, grad x, grad A, grad B) of a random-weighted loss."""
    adapter = model.proj.adapters["default"]
    model.zero_grad()
    x = x.detach().requires_grad_(True)
    out = fn(x)
    if inplace:  # as fair-esm's attention does with q *= scaling
        out *= 0.5
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    (out * weights).sum().backward()
    return [out.detach(), x.grad, adapter.lora_A.weight.grad, adapter.lora_B.weight.grad]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["plain-output", "inplace-on-output"])
def test_fused_float32_matches_plain_autograd(fused_calls, inplace, device):
    model = lora_linear(device=device).train()
    x = torch.randn(2, 5, 16).to(device)
    fused = gradients(model, model, x, inplace)
    assert fused_calls == [torch.float32]
    reference = gradients(lambda h: plain(model, h), model, x, inplace)
    for got, expected, what in zip(fused, reference, ["output", "x", "A", "B"], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=what)
    assert fused[2].dtype == fused[3].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_fused_bfloat16_matches_plain_autograd_within_bf16_tolerance(fused_calls, device):
    model = lora_linear(torch.bfloat16, device).train()
    adapter = model.proj.adapters["default"]
    assert adapter.lora_A.weight.dtype == torch.float32  # float32 master weights on a bf16 base
    x = torch.randn(4, 5, 16, dtype=torch.bfloat16).to(device)
    fused = gradients(model, model, x)
    assert fused_calls == [torch.bfloat16]
    assert fused[0].dtype == fused[1].dtype == torch.bfloat16  # activations are never upcast
    assert fused[2].dtype == fused[3].dtype == torch.float32
    reference = gradients(lambda h: plain(model, h), model, x)
    for got, expected, what in zip(fused, reference, ["output", "x", "A", "B"], strict=True):
        assert relative_error(got, expected) < 2e-2, what


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05),
        lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
        lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),  # updates without bumping version counters
    ],
    ids=["sgd", "adamw-foreach", "adamw-fused"],
)
def test_cast_cache_refreshes_after_an_optimiser_step(fused_calls, dtype, optimizer, device):
    model = lora_linear(dtype, device).train()
    x = torch.randn(3, 16, dtype=dtype).to(device)
    step = optimizer([p for p in model.parameters() if p.requires_grad])
    for _ in range(2):
        before = model(x)
        (before.float() ** 2).sum().backward()
        step.step()
        step.zero_grad()
        with torch.no_grad():
            after, expected = model(x), plain(model, x)
        tolerance = 1e-6 if dtype == torch.float32 else 1e-2
        assert relative_error(after, expected) < tolerance
        assert relative_error(before, expected) > 10 * tolerance  # a stale cache would give `before`
    assert len(fused_calls) == 4


def test_cache_from_inference_mode_is_not_reused_for_training(fused_calls):
    model = lora_linear(torch.bfloat16).train()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        evaluated = model(x)
    trained = model(x)
    trained.float().sum().backward()  # "Inference tensors cannot be saved for backward" before the fix
    assert torch.equal(trained.detach(), evaluated)
    assert model.proj.adapters["default"].lora_B.weight.grad is not None
    assert len(fused_calls) == 2


@pytest.mark.parametrize("case", ["trainable-base", "dora"])
def test_plain_path_where_the_fused_one_does_not_apply(fused_calls, case):
    model = lora_linear(use_dora=case == "dora").train()
    if case == "trainable-base":
        model.proj.base_layer.requires_grad_(True)
    model(torch.randn(3, 16))
    assert fused_calls == []


def bf16_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The LoRA Linear in plain bf16 autograd, no autocast: every weight and the input cast to bf16."""
    layer = model.proj
    adapter = layer.adapters["default"]
    a, b = adapter.lora_A.weight.to(torch.bfloat16), adapter.lora_B.weight.to(torch.bfloat16)
    weight, bias = layer.base_layer.weight.to(torch.bfloat16), layer.base_layer.bias.to(torch.bfloat16)
    h = x.to(torch.bfloat16)
    return F.linear(h, weight, bias) + F.linear(F.linear(h, a), b) * adapter.scaling


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["float32-base", "bf16-base"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["float32-x", "bf16-x"])
def test_fused_under_cpu_autocast_matches_plain_bf16_autograd(fused_calls, base_dtype, x_dtype):
    """Under autocast the fused path is taken and computes what plain bf16 autograd computes.

    A float32 base is what autocast alone gives (weights cast in every forward), a bf16 base what the
    precision policy gives; the input comes in float32 (after a norm) or bf16 (after another Linear).
    """
    model = lora_linear(base_dtype).train()
    x = torch.randn(4, 5, 16).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = gradients(model, model, x)
    assert fused_calls == [x_dtype]
    assert fused[0].dtype == torch.bfloat16  # as F.linear under autocast
    assert fused[1].dtype == x_dtype  # the gradient goes back through the cast to x's own dtype
    assert fused[2].dtype == fused[3].dtype == torch.float32
    reference = gradients(lambda h: bf16_reference(model, h), model, x)
    for got, expected, what in zip(fused, reference, ["output", "x", "A", "B"], strict=True):
        assert relative_error(got, expected) < 1e-2, what
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the package's own plain path, same autocast
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(LoRAAdapter, "fusable", lambda self, base, h: False)
            unfused = gradients(model, model, x)
    assert len(fused_calls) == 1
    for got, expected, what in zip(fused, unfused, ["output", "x", "A", "B"], strict=True):
        assert got.dtype == expected.dtype, what
        assert relative_error(got, expected) < 1e-2, what


def test_fused_under_autocast_leaves_float64_alone(fused_calls):
    model = lora_linear(torch.float64).train()
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float64 and fused_calls == [torch.float64]
    torch.testing.assert_close(out, plain(model, x))


def test_cast_cache_serves_autocast_and_float32_forwards_apart(fused_calls):
    model = lora_linear().train()
    x = torch.randn(3, 16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        full = model(x)
    assert (low.dtype, full.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(full, plain(model, x), atol=1e-6, rtol=0)
    assert relative_error(low, bf16_reference(model, x)) < 1e-2


class SharedInput(nn.Module):
    """Three projections of one input, as q, k and v read one normed hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def test_projections_of_one_float32_input_share_its_autocast_cast(monkeypatch):
    from pipelines.core.peft import lora

    model = SharedInput().requires_grad_(False)
    add_adapter(model, LoRA(r=4, alpha=8, targets=["q", "k", "v"]))
    perturb_adapters(model, scale=0.3)
    inputs = []
    original = lora._FusedLoRAStack.apply
    monkeypatch.setattr(
        lora._FusedLoRAStack, "apply", lambda x, *rest: inputs.append(x) or original(x, *rest)
    )
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared = model(x)
    assert len(inputs) == 3 and inputs[0] is inputs[1] is inputs[2]  # one cast, one saved copy
    weights = torch.randn(shared.shape, generator=torch.Generator().manual_seed(7))
    (shared.float() * weights).sum().backward()
    got = [shared.detach(), x.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(), x.grad.zero_()
    monkeypatch.setattr(lora, "_cast_input", lambda h, dtype: h.to(dtype))  # every projection casts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        separate = model(x)
    assert inputs[3] is not inputs[4]
    (separate.float() * weights).sum().backward()
    expected = [separate.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.equal(got[0], expected[0])
    assert relative_error(got[1], expected[1]) < 1e-2  # the shared cast sums x's gradient in bf16
    for mine, theirs in zip(got[2:], expected[2:], strict=True):
        assert torch.equal(mine, theirs)


def test_an_input_changed_in_place_is_cast_again():
    model = SharedInput().requires_grad_(False)
    add_adapter(model, LoRA(r=4, targets=["q", "k"]))
    perturb_adapters(model, scale=0.3)
    x = torch.randn(4, 16)
    before = x.clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.q(x)  # casts x
        x.mul_(2)
        second = model.k(x)  # a stale cast would give k(before)
        expected, stale = model.k(x.clone()), model.k(before)
    assert torch.equal(second, expected) and not torch.equal(second, stale)
