"""Per-example adapter routing: a mixed batch equals each group run alone with only its adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_testing import logits, make_tiny_llama, only_adapter, perturb_adapters, refused, weighted_loss
from torch import nn

from pipelines.core.peft import (
    IA3,
    SSF,
    Bottleneck,
    LoHa,
    LoKr,
    LoRA,
    NormTuning,
    Parallel,
    PromptTuning,
    VeRA,
    adapter_routing,
    add_adapter,
    compose,
    disable_adapters,
    merge,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LLAMA_ADAPTERS = {
    "lora": LoRA(r=4, targets=["q_proj", "v_proj", "down_proj"]),
    "dora": LoRA(r=2, targets=["o_proj"], use_dora=True),
    "loha": LoHa(r=2, targets=["q_proj", "k_proj"]),
    "lokr": LoKr(r=2, targets=["v_proj", "up_proj"]),
    "vera": VeRA(r=4, targets=["q_proj", "down_proj"]),
    "ia3": IA3(targets=["k_proj", "down_proj"]),
}


class Net(nn.Module):
    """Convolutions, a norm and Linears, as a plain torch module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, image):
        h = torch.relu(self.conv2(torch.relu(self.conv(image)))).mean(dim=(2, 3))
        return self.head(self.norm(torch.relu(self.fc(h))))


NET_ADAPTERS = {
    "lora": LoRA(r=2, targets=["conv", "fc"]),
    "loha": LoHa(r=2, targets=["conv2", "head"]),
    "lokr": LoKr(r=2, targets=["conv2", "fc"]),
    "ia3": IA3(targets=["conv", "head"]),
    "ssf": SSF(targets=["fc"]),
    "serial": Bottleneck(hidden=3, targets=["fc"]),
    "norm": NormTuning(targets=["norm"]),
}


def _adapted(model: nn.Module, specs: dict) -> nn.Module:
    for name, spec in specs.items():
        add_adapter(model, spec, name)
    perturb_adapters(model, scale=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return _adapted(make_tiny_llama(), LLAMA_ADAPTERS)


def _grouped(model: nn.Module, names: list, batch: torch.Tensor, run) -> torch.Tensor:
    """Each group of examples run alone, with only its adapter (or none), put back in batch order."""
    out = [None] * len(names)
    for name in dict.fromkeys(names):
        index = [i for i, n in enumerate(names) if n == name]
        if name is None:
            with disable_adapters(model):
                result = run(model, batch[index])
        else:
            result = run(only_adapter(model, name), batch[index])
        for row, i in zip(result, index, strict=True):
            out[i] = row
    return torch.stack(out)


ROUTE = ["lora", "loha", None, "lokr", "vera", "ia3", "lora", "dora", None]


def test_a_mixed_batch_on_a_tiny_llama_equals_each_group_alone(llama):
    ids = torch.randint(0, 64, (len(ROUTE), 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stacked = llama(input_ids=ids).logits
    with adapter_routing(llama, ROUTE):
        routed = logits(llama, ids)
    torch.testing.assert_close(routed, _grouped(llama, ROUTE, ids, logits), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(llama, ids), stacked, atol=0, rtol=0)  # the stack again after the block


def test_greedy_generation_under_routing_equals_each_group_alone(llama):
    names = ["lora", None, "vera", "lora"]
    ids = torch.randint(0, 64, (len(names), 5), generator=torch.Generator().manual_seed(4))

    def generate(model, batch):
        return model.generate(input_ids=batch, max_new_tokens=4, do_sample=False, pad_token_id=0)

    with torch.no_grad(), adapter_routing(llama, names):
        routed = generate(llama, ids)
    with torch.no_grad():
        assert torch.equal(routed, _grouped(llama, names, ids, generate))


def test_a_mixed_batch_on_linear_and_conv_layers_equals_each_group_alone():
    torch.manual_seed(0)
    model = _adapted(Net(), NET_ADAPTERS)
    names = ["lora", "loha", "lokr", None, "ia3", "ssf", "serial", "norm", "lora"]
    images = torch.randn(len(names), 3, 5, 5)

    def run(m, batch):
        with torch.no_grad():
            return m(batch)

    with adapter_routing(model, names):
        routed = run(model, images)
    torch.testing.assert_close(routed, _grouped(model, names, images, run), atol=1e-6, rtol=0)


def test_routed_gradients_reach_only_the_adapters_used_and_equal_the_groups_own():
    model = _adapted(Net(), NET_ADAPTERS).train()
    names = ["lora", None, "lora", "serial"]
    images = torch.randn(len(names), 3, 5, 5)
    for key, parameter in model.named_parameters():
        parameter.requires_grad_(".adapters." in key)
    with adapter_routing(model, names):
        weighted_loss(model(images)[[0, 2]]).backward()
    alone = only_adapter(model, "lora")
    alone.zero_grad()
    weighted_loss(alone(images[[0, 2]])).backward()
    for key, parameter in model.named_parameters():
        if ".adapters.lora." in key:
            torch.testing.assert_close(parameter.grad, dict(alone.named_parameters())[key].grad, atol=1e-6,
                                       rtol=0)  # fmt: skip
        elif ".adapters." in key and ".adapters.serial." not in key:
            assert parameter.grad is None, key


def test_routing_refusals(llama):
    model = copy.deepcopy(llama)
    ids = torch.randint(0, 64, (3, 5))
    with refused(
        "adapter_routing names 2 examples, but layer 'model.layers.0.self_attn.q_proj' got an input of shape "
        "(3, 5, 32), whose first dimension is not the batch; pass one adapter name per example."
    ):
        with adapter_routing(model, ["lora", None]):
            model(input_ids=ids)
    with refused(
        "adapter_routing routes example 1 to 'lorra', which the model does not have; it has ['lora', 'dora', "
        "'loha', 'lokr', 'vera', 'ia3']."
    ):
        with adapter_routing(model, ["lora", "lorra"]):
            pass
    with refused(
        "adapter_routing takes one adapter name (or None) per example, e.g. ['a', 'b', None], not 'lora'."
    ):
        with adapter_routing(model, "lora"):
            pass
    compose(model, Parallel(["lora"]))
    with refused(
        "adapter_routing cannot route under a composition (Parallel or Fuse); compose(model, None) first."
    ):
        with adapter_routing(model, ["lora"]):
            pass
    compose(model, None)
    merge(model, ["lora"])
    with refused(
        "Adapter 'lora' is merged into 'model.layers.0.self_attn.q_proj', so every example would get it; "
        "unmerge(model) before routing."
    ):
        with adapter_routing(model, ["lora"]):
            pass
    prompted = add_adapter(
        copy.deepcopy(llama), PromptTuning(num_tokens=2, targets=["embed_tokens"]), "prompt"
    )
    with refused(
        "Adapter 'prompt' is prompt tuning, which cannot be routed per example: it inserts tokens at "
        "'model.embed_tokens', so its examples would be longer than the others' and could not share one "
        "batch; run them in a batch of their own."
    ):
        with adapter_routing(prompted, ["prompt", None]):
            pass
    with adapter_routing(prompted, ["lora", None]):  # the prompt is off for every example
        out = logits(prompted, ids[:2])
    torch.testing.assert_close(out, _grouped(llama, ["lora", None], ids[:2], logits), atol=1e-6, rtol=0)
    batch_norm = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    add_adapter(batch_norm, NormTuning(targets=["1"]), "norm")
    with refused(
        "Cannot route examples through '1' in training mode: BatchNorm normalises with the whole batch's "
        "statistics, so each example would depend on the others; call model.eval()."
    ):
        with adapter_routing(batch_norm, ["norm", None]):
            batch_norm(torch.randn(2, 3, 4, 4))


class CallRewriter(nn.Module):
    """Stands for P-tuning or prefix tuning: an identity on its layer that rewrites the model's call."""

    kind, mergeable, merged = "transform", False, False

    def transform(self, out):
        return out

    def rewrite_call(self, module, args, kwargs):
        return args, kwargs


def test_adapters_that_rewrite_the_models_call_are_refused(llama):
    model = copy.deepcopy(llama)
    model.model.layers[0].self_attn.q_proj.adapters["prefix"] = CallRewriter()
    with refused(
        "Adapter 'prefix' changes the whole model's call (P-tuning or prefix tuning: its inputs, cache and "
        "mask), not one layer's output, so it cannot be routed per example nor kept from the other examples; "
        "remove_adapter(model, 'prefix') first."
    ):
        with adapter_routing(model, ["lora"]):
            pass
    with refused(
        "Adapter 'prefix' changes the whole model's call (P-tuning or prefix tuning: its inputs, cache and "
        "mask), so Parallel can neither combine it nor switch it off; remove_adapter(model, 'prefix') first."
    ):
        compose(model, Parallel(["lora"]))
