"""The fused LoRA path keeps no copy of a gated feed-forward's product: it rebuilds it in backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.core.peft import LoRA, add_adapter


class GatedFeedForward(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 24):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(width, hidden), nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    model(x).square().sum().backward()
    return [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


def test_down_projection_gradients_equal_the_plain_path():
    torch.manual_seed(0)
    model = GatedFeedForward()
    add_adapter(model, LoRA(r=4, targets=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    x = torch.randn(3, 5, 8)
    fused = _grads(model, x)
    model.eval()  # same weights, dropout-free either way; force the plain path through autocast-free delta
    plain_adapter = model.down_proj.adapters["default"]
    plain_adapter.fusable = lambda base, x: False
    plain = _grads(model, x)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_product_is_not_saved_for_backward():
    torch.manual_seed(0)
    model = GatedFeedForward(width=16, hidden=64)
    add_adapter(model, LoRA(r=2, targets=["down_proj"]))
    saved: list[torch.Tensor] = []
    products: list[torch.Tensor] = []
    model.down_proj.register_forward_pre_hook(lambda module, args: products.append(args[0]))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(torch.randn(4, 16, requires_grad=True)).sum().backward()
    product = products[0]
    assert all(t.untyped_storage().data_ptr() != product.untyped_storage().data_ptr() for t in saved)
