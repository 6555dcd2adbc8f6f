"""Parallel and Fuse compositions, checked layer by layer against each adapter run alone."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_testing import logits, make_tiny_llama, only_adapter, perturb_adapters, refused, weighted_loss
from torch import nn

from pipelines.core.peft import (
    IA3,
    Bottleneck,
    Fuse,
    LoHa,
    LoRA,
    Parallel,
    PromptTuning,
    VeRA,
    active_composition,
    add_adapter,
    compose,
    disable_adapters,
    load_fusion,
    merge,
    remove_adapter,
    remove_fusion,
    save_fusion,
    unmerge,
    wrappers,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class Net(nn.Module):
    """A convolution, a Linear and a head: channels on dimension 1 and last."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, image):
        h = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(h)))


NET_ADAPTERS = {
    "lora": LoRA(r=2, targets=["conv", "fc"]),
    "ia3": IA3(targets=["conv", "fc"]),
    "serial": Bottleneck(hidden=3, targets=["fc"]),
    "loha": LoHa(r=2, targets=["conv", "head"]),
}


def _net() -> nn.Module:
    model = Net()
    for name, spec in NET_ADAPTERS.items():
        add_adapter(model, spec, name)
    perturb_adapters(model, scale=0.3)
    return model.eval()


def _llama(names=("lora", "loha", "vera")) -> nn.Module:
    torch.manual_seed(0)
    model = make_tiny_llama()
    specs = {
        "lora": LoRA(r=4, targets=["q_proj", "v_proj", "down_proj"]),
        "loha": LoHa(r=2, targets=["q_proj", "o_proj"]),
        "vera": VeRA(r=4, targets=["v_proj", "down_proj"]),
        "ia3": IA3(targets=["k_proj", "down_proj"]),
    }
    for name in names:
        add_adapter(model, specs[name], name)
    perturb_adapters(model, scale=0.2)
    return model


def _layer_io(model: nn.Module, run) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted layer's input and output while `run()` runs."""
    seen, handles = {}, []
    for path, wrapper in wrappers(model):

        def hook(module, args, out, path=path):
            seen[path] = (args[0].detach(), out.detach())

        handles.append(wrapper.register_forward_hook(hook))
    with torch.no_grad():
        run()
    for handle in handles:
        handle.remove()
    return seen


def _alone_outputs(model: nn.Module, names: list[str], path: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The layer's output on x with each named adapter alone (the base layer where it is absent)."""
    outputs = []
    for name in names:
        with torch.no_grad():
            outputs.append(only_adapter(model, name).get_submodule(path)(x))
    return outputs


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_parallel_is_the_base_plus_each_adapters_own_change_at_every_layer(reduce):
    model = _net()
    names = ["lora", "ia3", "serial", "loha"]
    compose(model, Parallel(names, reduce=reduce))
    image = torch.randn(3, 3, 5, 5)
    io = _layer_io(model, lambda: model(image))
    assert set(io) == {"conv", "fc", "head"}
    for path, (x, out) in io.items():
        base = model.get_submodule(path).base_layer(x)
        present = [n for n in names if n in model.get_submodule(path).adapters]
        changes = [alone - base for alone in _alone_outputs(model, present, path, x)]
        total = sum(changes) / (len(present) if reduce == "mean" else 1)
        torch.testing.assert_close(out, base + total, atol=1e-6, rtol=0, msg=path)


def test_parallel_sum_of_additive_adapters_is_the_stack_and_merges(input_ids):
    model = _llama()
    stacked = logits(model, input_ids)
    compose(model, Parallel(["lora", "loha", "vera"]))
    parallel = logits(model, input_ids)
    merge(model)
    merged = logits(model, input_ids)
    unmerge(model)
    compose(model, Parallel(["lora", "loha", "vera"], reduce="mean"))
    mean = logits(model, input_ids)
    torch.testing.assert_close(parallel, stacked, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, stacked, atol=1e-5, rtol=0)
    assert (mean - stacked).abs().max() > 1e-2


def test_serial_adapters_in_parallel_do_not_see_each_other():
    model = _net()
    compose(model, Parallel(["ia3", "serial"]))
    image = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        parallel = model(image)
        compose(model, None)
        for name in ("lora", "loha"):
            remove_adapter(model, name)
        stacked = model(image)
    assert (parallel - stacked).abs().max() > 1e-3  # in the stack, the bottleneck reads IA3's output


def test_adapters_outside_the_composition_are_off_and_none_restores_the_stack():
    model = _net()
    image = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        stacked = model(image)
        compose(model, Parallel(["lora"]))
        assert active_composition(model) == Parallel(["lora"])
        only_lora = model(image)
        with disable_adapters(model):
            base = model(image)
        compose(model, None)
        back = model(image)
        expected, plain = only_adapter(model, "lora")(image), copy.deepcopy(model)
        for name in NET_ADAPTERS:
            remove_adapter(plain, name)
    torch.testing.assert_close(only_lora, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(base, plain(image), atol=0, rtol=0)
    torch.testing.assert_close(back, stacked, atol=0, rtol=0)
    assert active_composition(model) is None


def test_fuse_starts_as_the_average_and_trains_only_its_own_parameters(input_ids):
    model = _llama()
    mean = compose(copy.deepcopy(model), Parallel(["lora", "loha", "vera"], reduce="mean"))
    compose(model, Fuse(["lora", "loha", "vera"]), name="fusion")
    out = model(input_ids=input_ids).logits
    torch.testing.assert_close(out, logits(mean, input_ids), atol=1e-5, rtol=0)
    trainable = {key for key, p in model.named_parameters() if p.requires_grad}
    fusion_keys = {key for key, _ in model.named_parameters() if ".fusions.fusion." in key}
    assert trainable == fusion_keys and len(fusion_keys) == 5 * len(wrappers(model))
    weighted_loss(out).backward()
    for path, wrapper in wrappers(model):
        fusion = wrapper.fusions["fusion"]
        present = [n for n in ("lora", "loha", "vera") if n in wrapper.adapters]
        assert fusion.value_weight.grad.abs().max() > 0, path
        # one adapter gets attention weight 1 whatever its key: the key has no gradient there
        assert (fusion.key_weight.grad.abs().max() > 0) == (len(present) > 1), path
    assert all(p.grad is None for key, p in model.named_parameters() if key not in fusion_keys)


def _fused_reference(fusion: nn.Module, base: torch.Tensor, changes: list[torch.Tensor], dim: int):
    """AdapterFusion written out along channel dimension `dim`, independent of FusionLayer.forward."""
    h = base.movedim(dim, -1)
    c = torch.stack([change.movedim(dim, -1) for change in changes])  # (adapters, ..., channels)
    query = torch.einsum("...j,ij->...i", h, fusion.query_weight) + fusion.query_bias
    keys = torch.einsum("n...j,ij->n...i", c, fusion.key_weight) + fusion.key_bias
    values = torch.einsum("n...j,ij->n...i", c, fusion.value_weight)
    weights = torch.softmax((keys * query).sum(-1) / fusion.temperature, dim=0)
    return (h + (weights[..., None] * values).sum(0)).movedim(-1, dim)


def test_fuse_is_attention_over_the_adapters_changes_at_every_layer():
    model = _net()
    names = ["lora", "ia3", "loha"]
    compose(model, Fuse(names, temperature=2.0), name="mix")
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if ".fusions." in key:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    image = torch.randn(3, 3, 5, 5)
    io = _layer_io(model, lambda: model(image))
    for path, (x, out) in io.items():
        wrapper = model.get_submodule(path)
        base = wrapper.base_layer(x)
        present = [n for n in names if n in wrapper.adapters]
        changes = [alone - base for alone in _alone_outputs(model, present, path, x)]
        dim = 1 if path == "conv" else -1
        with torch.no_grad():
            expected = _fused_reference(wrapper.fusions["mix"], base, changes, dim)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0, msg=path)


def test_fusion_files_round_trip(tmp_path, input_ids):
    model = _llama()
    fresh = copy.deepcopy(model)
    compose(model, Fuse(["lora", "vera"]), name="fusion")
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if ".fusions." in key:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    save_fusion(model, tmp_path, "fusion")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion_config.json", "fusion_model.safetensors"]
    assert load_fusion(fresh, tmp_path) == "fusion"
    assert active_composition(fresh) == Fuse(["lora", "vera"])
    torch.testing.assert_close(logits(fresh, input_ids), logits(model, input_ids), atol=0, rtol=0)
    assert {k for k, p in fresh.named_parameters() if p.requires_grad} == {
        k for k in dict(fresh.named_parameters()) if ".fusions." in k
    }
    remove_fusion(fresh, "fusion")
    assert active_composition(fresh) is None
    assert not any(".fusions.fusion." in key for key in fresh.state_dict())
    compose(model, None)
    compose(model, "fusion")  # a built fusion switches back on by name
    assert active_composition(model) == Fuse(["lora", "vera"])


def test_composition_refusals(tmp_path):
    model = _net()
    add_adapter(model, PromptTuning(num_tokens=2, channels=8, targets=["fc"]), "prompt")
    with refused("Parallel names adapter 'x', which the model does not have; it has "
                 "['lora', 'ia3', 'serial', 'loha', 'prompt']."):  # fmt: skip
        compose(model, Parallel(["lora", "x"]))
    with refused("Fuse names no adapters; pass the adapters to compose, e.g. Fuse(['a', 'b'])."):
        compose(model, Fuse([]))
    with refused("Parallel names an adapter twice (['lora', 'lora']); name each once."):
        compose(model, Parallel(["lora", "lora"]))
    with refused("Parallel reduce 'max' is not 'sum' or 'mean'."):
        compose(model, Parallel(["lora"], reduce="max"))
    with refused("Fuse temperature must be positive, not 0.0."):
        compose(model, Fuse(["lora"], temperature=0.0))
    with refused(
        "Adapter 'prompt' on 'fc' is prompt tuning, which inserts tokens, so its output cannot be added to "
        "other adapters' in Parallel; leave it out of the composition."
    ):
        compose(model, Parallel(["lora", "prompt"]))
    with refused(
        "The model already has an adapter or fusion named 'lora'; choose another name, or "
        "compose(model, 'lora') to switch a built fusion on."
    ):
        compose(model, Fuse(["lora", "ia3"]), name="lora")
    with refused(
        "The model has no fusion named 'mix'; it has []; build one with compose(model, Fuse([...]), "
        "name=...)."
    ):
        compose(model, "mix")
    with refused("compose takes Parallel(...), Fuse(...), a fusion's name or None, not list.", TypeError):
        compose(model, ["lora"])
    remove_adapter(model, "prompt")
    compose(model, Parallel(["lora", "loha"], reduce="mean"))
    merge(model, ["lora"])
    with refused(
        "Adapter 'lora' is merged into 'conv', so Parallel(reduce='mean') cannot compute it apart from the "
        "base weights; unmerge(model) first (only Parallel(reduce='sum') of additive adapters keeps merged "
        "ones)."
    ):
        model(torch.randn(1, 3, 5, 5))
    unmerge(model)
    fresh = copy.deepcopy(model)
    compose(model, Fuse(["lora", "ia3"]), name="mix")
    save_fusion(model, tmp_path, "mix")
    remove_adapter(fresh, "ia3")
    with refused(
        f"{tmp_path} fuses adapter 'ia3', which the model does not have (it has ['lora', 'serial', 'loha']); "
        "load_adapter the fused adapters first."
    ):
        load_fusion(fresh, tmp_path)
    missing = f"{tmp_path / 'nothing'} has no fusion_config.json; it is not a fusion directory (save_fusion)."
    with refused(missing, FileNotFoundError):
        (tmp_path / "nothing").mkdir()
        load_fusion(fresh, tmp_path / "nothing")
