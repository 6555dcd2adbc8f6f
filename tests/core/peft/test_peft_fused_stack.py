"""The fused LoRA Function with dropout and with several LoRA adapters stacked on one Linear, against plain
autograd written out with F.dropout and F.linear (the same random numbers, drawn in the same order)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from peft_testing import perturb_adapters, relative_error
from torch import nn

from pipelines.core.peft import LoRA, add_adapter, set_trainable


def stacked(dropouts: tuple[float, ...], trainable: list[str], dtype=torch.float32) -> nn.Module:
    """A Linear with one LoRA adapter per dropout (named a0, a1, ...); ``trainable`` adapters train."""
    model = nn.Sequential(OrderedDict(proj=nn.Linear(16, 12))).to(dtype)
    for i, p in enumerate(dropouts):
        add_adapter(model, LoRA(r=2 + i, alpha=4 + 2 * i, dropout=p, targets=["proj"]), name=f"a{i}")
    perturb_adapters(model, scale=0.3)
    set_trainable(model, trainable)
    return model.train()


def written_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Base plus each adapter's (dropout(x) A^T) B^T s, in the order added."""
    layer = model.proj
    out = F.linear(x, layer.base_layer.weight.to(x.dtype), layer.base_layer.bias.to(x.dtype))
    for adapter in layer.adapters.values():
        h = F.dropout(x, adapter.spec.dropout, training=True)
        a, b = adapter.lora_A.weight.to(x.dtype), adapter.lora_B.weight.to(x.dtype)
        out = out + F.linear(F.linear(h, a), b) * adapter.scaling
    return out


def run(fn, model: nn.Module, x: torch.Tensor, seed: int = 3) -> list[torch.Tensor | None]:
    """Output, x's gradient and every adapter factor's gradient (None where it does not train)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    (out.float() * weights).sum().backward()
    factors = [p.grad for name, p in model.named_parameters() if "lora_" in name]
    return [out.detach(), x.grad, *factors]


CASES = {
    "one-adapter-dropout": ((0.5,), ["a0"]),
    "frozen-under-trained-with-dropout": ((0.0, 0.1), ["a1"]),  # stage 2 over a frozen domain adapter
    "both-train-one-dropout": ((0.0, 0.1), ["a0", "a1"]),  # the clinical demo's variant (d)
    "three-with-dropouts": ((0.3, 0.0, 0.2), ["a0", "a2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_stack_matches_written_out_autograd(fused_calls, case):
    dropouts, trainable = CASES[case]
    model = stacked(dropouts, trainable)
    x = torch.randn(2, 5, 16)
    fused = run(model, model, x)
    assert fused_calls == [torch.float32] * len(dropouts)  # every adapter on the fused path, in one call
    reference = run(lambda h: written_out(model, h), model, x)
    for index, (got, expected) in enumerate(zip(fused, reference, strict=True)):
        if expected is None:
            assert got is None, index  # a frozen adapter gets no gradient
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"tensor {index}")
    assert all(g is None or g.dtype == torch.float32 for g in fused[2:])


def test_dropout_draws_a_new_mask_per_forward_and_none_in_eval(fused_calls):
    model = stacked((0.5,), ["a0"])
    x = torch.randn(4, 16)
    with torch.no_grad():
        first, second = model(x), model(x)
        model.eval()
        evaluated = model(x)
    assert not torch.equal(first, second)
    layer, adapter = model.proj, model.proj.adapters["a0"]
    plain = layer.base_layer(x) + F.linear(F.linear(x, adapter.lora_A.weight), adapter.lora_B.weight) * 2.0
    torch.testing.assert_close(evaluated, plain, atol=1e-6, rtol=0)
    assert len(fused_calls) == 3


def test_under_cpu_bf16_autocast_the_stack_is_fused_and_close_to_written_out_bf16(fused_calls):
    model = stacked((0.0, 0.1), ["a0", "a1"], dtype=torch.bfloat16)
    x = torch.randn(4, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = run(model, model, x)
    assert fused_calls == [torch.float32, torch.float32]
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.float32
    reference = run(lambda h: written_out(model, h.to(torch.bfloat16)), model, x)
    for index, (got, expected) in enumerate(zip(fused, reference, strict=True)):
        assert relative_error(got, expected) < 2e-2, index


def test_dropout_keeps_a_boolean_mask_not_a_copy_of_the_input():
    model = stacked((0.1,), ["a0"])
    x = torch.randn(64, 16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).sum().backward()
    full = [t for t in saved if t.shape == x.shape]
    assert sorted(str(t.dtype) for t in full) == ["torch.bool", "torch.float32"]  # x and the keep mask
    assert sum(t.numel() * t.element_size() for t in full) == x.numel() * 5


def test_dropout_rescale_is_exact_under_bf16_autocast():
    """The kept inputs are scaled by 1/(1-p) exactly, not by its bf16 rounding (1.109375 for p = 0.1, a
    bias of -0.16% on every kept activation): the delta's mean ratio to a float64 reference built from the
    same mask is 1 to well within that."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(proj=nn.Linear(64, 64))).to(torch.bfloat16)
    with torch.no_grad():
        model.proj.weight.zero_(), model.proj.bias.zero_()  # the output is the adapter's delta alone
    add_adapter(model, LoRA(r=8, alpha=8, dropout=0.1, targets=["proj"]))
    perturb_adapters(model, scale=0.5)
    model.train()
    x = torch.randn(64, 64) + 3.0  # positive on the whole: the delta does not average out to zero
    torch.manual_seed(5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.manual_seed(5)
    h = x.to(torch.bfloat16)
    mask = torch.empty_like(h).bernoulli_(0.9).double()  # the draw the fused path makes, on the cast input
    adapter = model.proj.adapters["default"]
    a = adapter.lora_A.weight.to(torch.bfloat16).double()
    b = (adapter.lora_B.weight * adapter.scaling).to(torch.bfloat16).double()
    expected = (h.double() * mask / 0.9) @ a.t() @ b.t()
    ratio = (out.double() * expected).sum() / (expected * expected).sum()
    assert abs(ratio.item() - 1) < 3e-4, ratio.item()
