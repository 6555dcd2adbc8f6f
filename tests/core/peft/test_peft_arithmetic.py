"""Adapter arithmetic, HF peft's add_weighted_adapter the oracle: same factors, updates and logits."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_testing import import_hf_peft, logits, only_adapter, refused
from torch import nn

from pipelines.core.peft import (
    IA3,
    LoRA,
    add_adapter,
    add_weighted_adapter,
    load_adapter,
    save_adapter,
    wrappers,
)
from pipelines.core.peft.arithmetic import factors

peft = import_hf_peft()
merge_utils = pytest.importorskip("peft.utils.merge_utils")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# name -> (r, alpha, targets); a and b share a rank (factor-wise rules need one), c has another
SOURCES = {
    "math": (4, 8, ["q_proj", "v_proj"]),
    "bio": (4, 16, ["q_proj", "k_proj", "down_proj"]),
    "chem": (2, 4, ["v_proj", "o_proj"]),
}


class Plain(nn.Module):
    """An Embedding, a Conv2d, a 1x1 Conv2d and a Linear: the layer kinds peft's arithmetic handles."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.point = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, ids, image):
        return self.fc(self.embed(ids)).sum() + self.point(self.conv(image)).sum()


PLAIN_SOURCES = {"math": (4, 8, ["embed", "conv", "fc"]), "bio": (4, 4, ["embed", "point", "fc"])}


def _pair(base: nn.Module, sources: dict, seed: int = 1):
    """A peft model and ours, on copies of `base`, with the same perturbed LoRA adapters."""
    configs = {
        name: peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
        for name, (r, alpha, targets) in sources.items()
    }
    names = list(sources)
    theirs = peft.get_peft_model(copy.deepcopy(base), configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, configs[name])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in theirs.named_parameters():
            if "lora_" in key:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    ours = copy.deepcopy(base)
    for name, (r, alpha, targets) in sources.items():
        add_adapter(ours, LoRA(r=r, alpha=alpha, targets=list(targets)), name=name)
    inner = theirs.base_model.model
    with torch.no_grad():
        for path, wrapper in wrappers(ours):
            layer = inner.get_submodule(path)
            for name, adapter in wrapper.adapters.items():
                a, b = factors(adapter)
                if name in layer.lora_A:
                    a.copy_(layer.lora_A[name].weight)
                    b.copy_(layer.lora_B[name].weight)
                else:
                    a.copy_(layer.lora_embedding_A[name])
                    b.copy_(layer.lora_embedding_B[name])
    return theirs, ours


def _assert_same_adapter(theirs, ours, name: str, factor_atol: float | None = 1e-6, delta_atol: float = 1e-5):
    inner, compared = theirs.base_model.model, 0
    for path, wrapper in wrappers(ours):
        if name not in wrapper.adapters:
            continue
        layer, adapter = inner.get_submodule(path), wrapper.adapters[name]
        if name in layer.lora_A:
            their_a, their_b = layer.lora_A[name].weight, layer.lora_B[name].weight
        else:
            their_a, their_b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        our_a, our_b = factors(adapter)
        if factor_atol is not None:
            torch.testing.assert_close(our_a, their_a, atol=factor_atol, rtol=0, msg=f"A of {path}")
            torch.testing.assert_close(our_b, their_b, atol=factor_atol, rtol=0, msg=f"B of {path}")
        torch.testing.assert_close(
            adapter.delta_weight(wrapper.base_layer),
            layer.get_delta_weight(name).float(),
            atol=delta_atol,
            rtol=0,
        )
        assert adapter.scaling == layer.scaling[name] == 1.0
        compared += 1
    peft_layers = [
        m
        for m in inner.modules()
        if hasattr(m, "lora_A") and (name in m.lora_A or name in m.lora_embedding_A)
    ]
    assert compared == len(peft_layers) > 0


DETERMINISTIC = [
    ("linear", ["math", "bio"], [0.6, -0.3], {}),
    ("cat", ["math", "bio", "chem"], [0.6, -0.3, 1.2], {}),
    ("svd", ["math", "bio", "chem"], [0.6, -0.3, 1.2], {}),
    ("svd", ["math", "chem"], [1.0, 0.5], {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", ["math", "bio"], [0.6, 0.8], {"density": 0.5}),
    ("ties", ["math", "bio"], [0.6, 0.8], {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", ["math", "bio", "chem"], [0.6, 0.8, -0.5], {"density": 0.5}),
    ("magnitude_prune", ["math", "bio"], [0.6, 0.8], {"density": 0.4}),
    ("magnitude_prune_svd", ["math", "chem"], [0.6, 0.8], {"density": 0.4}),
]


@pytest.mark.parametrize(("combination", "sources", "weights", "options"), DETERMINISTIC)
def test_combinations_match_hf_peft_on_a_tiny_llama(
    tiny_llama, input_ids, combination, sources, weights, options
):
    theirs, ours = _pair(tiny_llama, SOURCES)
    theirs.add_weighted_adapter(sources, weights, "mixed", combination_type=combination, **options)
    add_weighted_adapter(ours, sources, weights, "mixed", combination_type=combination, **options)
    svd = combination.endswith("svd")
    _assert_same_adapter(theirs, ours, "mixed", factor_atol=1e-5 if svd else 1e-6)
    theirs.set_adapter("mixed")
    expected = logits(theirs, input_ids)
    torch.testing.assert_close(logits(only_adapter(ours, "mixed"), input_ids), expected, atol=1e-5, rtol=0)


def _record_peft_rng(monkeypatch) -> dict:
    """The global RNG state at peft's first DARE mask (after it has built its new adapter's layers)."""
    seen: dict = {}
    original = merge_utils.random_pruning

    def recording(tensor, density, rescale):
        seen.setdefault("state", torch.get_rng_state())
        return original(tensor, density, rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", recording)
    return seen


@pytest.mark.parametrize(
    ("combination", "sources"),
    [("dare_linear", ["math", "bio"]), ("dare_ties", ["math", "bio"]),
     ("dare_linear_svd", ["math", "bio", "chem"]), ("dare_ties_svd", ["math", "chem"])],
)  # fmt: skip
def test_dare_matches_hf_peft_given_the_same_random_state(tiny_llama, monkeypatch, combination, sources):
    theirs, ours = _pair(tiny_llama, SOURCES)
    seen = _record_peft_rng(monkeypatch)
    weights = [0.7, -0.4, 0.9][: len(sources)]
    torch.manual_seed(123)
    theirs.add_weighted_adapter(sources, weights, "mixed", combination_type=combination, density=0.5)
    generator = torch.Generator()
    generator.set_state(seen["state"])
    add_weighted_adapter(ours, sources, weights, "mixed", combination_type=combination, density=0.5,
                         generator=generator)  # fmt: skip
    _assert_same_adapter(theirs, ours, "mixed", factor_atol=1e-5)


def test_dare_uses_the_global_generator_without_one(tiny_llama):
    results = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)
        ours = _pair(tiny_llama, SOURCES)[1]
        torch.manual_seed(seed)
        add_weighted_adapter(
            ours, ["math", "bio"], [0.5, 0.5], "mixed", combination_type="dare_linear", density=0.5
        )
        results.append(factors(ours.model.layers[0].self_attn.q_proj.adapters["mixed"])[0].detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])
    kept = (results[0] != 0).float().mean().item()  # both sources on q_proj: an entry survives if either does
    assert 0.6 < kept < 0.9


@pytest.mark.parametrize("combination", ["linear", "cat", "svd", "ties"])
def test_combinations_match_hf_peft_on_embedding_and_conv_layers(combination):
    torch.manual_seed(0)
    theirs, ours = _pair(Plain(), PLAIN_SOURCES)
    options = {"density": 0.5} if combination == "ties" else {}
    theirs.add_weighted_adapter(["math", "bio"], [0.7, 0.4], "mixed", combination_type=combination, **options)
    add_weighted_adapter(ours, ["math", "bio"], [0.7, 0.4], "mixed", combination_type=combination, **options)
    # peft computes a k x k convolution's update with conv2d, we with a matrix product: equal to rounding
    _assert_same_adapter(theirs, ours, "mixed", factor_atol=None if combination == "svd" else 1e-6)


def _update(adapter: nn.Module) -> torch.Tensor:
    """s B A of a Linear LoRA, from its factors (independent of delta_weight)."""
    return adapter.lora_B.weight @ adapter.lora_A.weight * adapter.scaling


@pytest.mark.parametrize(("combination", "options"), [("cat", {}), ("svd", {"svd_rank": 10})])
def test_cat_and_full_rank_svd_are_exactly_the_weighted_sum_of_updates(tiny_llama, combination, options):
    ours = _pair(tiny_llama, SOURCES)[1]
    weights = {"math": 0.6, "bio": -0.3, "chem": 1.2}
    add_weighted_adapter(ours, list(weights), list(weights.values()), "mixed", combination_type=combination,
                         **options)  # fmt: skip
    for path, wrapper in wrappers(ours):
        expected = sum(w * _update(wrapper.adapters[n]) for n, w in weights.items() if n in wrapper.adapters)
        torch.testing.assert_close(_update(wrapper.adapters["mixed"]), expected, atol=1e-5, rtol=0, msg=path)
    assert ours.model.layers[0].self_attn.q_proj.adapters["mixed"].r == (10 if combination == "svd" else 10)


def test_one_adapter_is_rescaled_linearly_whatever_the_combination(tiny_llama):
    model = add_adapter(
        copy.deepcopy(tiny_llama), LoRA(r=4, alpha=8, targets=["q_proj"], use_rslora=True), "math"
    )
    with torch.no_grad():
        for wrapper in (w for _, w in wrappers(model)):
            wrapper.adapters["math"].lora_B.weight.normal_()
    add_weighted_adapter(model, ["math"], [1.0], "copy", combination_type="ties", density=0.1)
    for _, wrapper in wrappers(model):
        base = wrapper.base_layer
        # rsLoRA's scale alpha / sqrt(r) is folded into the factors; peft would keep use_rslora and rescale
        expected = wrapper.adapters["math"].delta_weight(base)
        torch.testing.assert_close(wrapper.adapters["copy"].delta_weight(base), expected, atol=1e-6, rtol=0)


def test_the_new_adapter_trains_and_round_trips_through_a_file(tiny_llama, tmp_path):
    ours = _pair(tiny_llama, SOURCES)[1]
    for name in ("math", "bio", "chem"):
        for _, wrapper in wrappers(ours):
            if name in wrapper.adapters:
                wrapper.adapters[name].requires_grad_(name == "math")
    add_weighted_adapter(ours, ["math", "chem"], [0.5, 0.5], "mixed", combination_type="cat")
    trainable = {
        key.split(".adapters.")[1].split(".")[0] for key, p in ours.named_parameters() if p.requires_grad
    }
    assert trainable == {"math", "mixed"}
    save_adapter(ours, tmp_path, name="mixed")
    fresh = copy.deepcopy(tiny_llama)
    load_adapter(fresh, tmp_path)
    for (path, wrapper), (_, loaded) in zip(
        [(p, w) for p, w in wrappers(ours) if "mixed" in w.adapters], wrappers(fresh), strict=True
    ):
        assert torch.equal(factors(wrapper.adapters["mixed"])[0], factors(loaded.adapters["mixed"])[0]), path


def test_refusals(tiny_llama):
    model = _pair(tiny_llama, SOURCES)[1]
    add_adapter(model, LoRA(r=4, targets=["up_proj"], use_dora=True), "dora")
    add_adapter(model, IA3(targets=["down_proj"]), "scale")
    with refused("The model already has an adapter named 'math'; choose another name."):
        add_weighted_adapter(model, ["math", "bio"], [1, 1], "math")
    with refused(
        "add_weighted_adapter needs one weight per adapter; got adapters ['math', 'bio'] and weights [1]."
    ):
        add_weighted_adapter(model, ["math", "bio"], [1], "mixed")
    with refused("The model has no adapter named 'x'; it has ['math', 'bio', 'chem', 'dora', 'scale']."):
        add_weighted_adapter(model, ["math", "x"], [1, 1], "mixed")
    with refused(
        "add_weighted_adapter combines plain LoRA adapters only; 'dora' is DoRA, whose update is not a "
        "low-rank product B A."
    ):
        add_weighted_adapter(model, ["math", "dora"], [1, 1], "mixed")
    with refused(
        "add_weighted_adapter combines plain LoRA adapters only; 'scale' is ia3, whose update is not a "
        "low-rank product B A."
    ):
        add_weighted_adapter(model, ["math", "scale"], [1, 1], "mixed")
    with refused(
        "combination_type 'linear' combines A and B factor by factor, so all adapters need one rank; they "
        "have ranks [2, 4]; use 'cat' or 'svd'."
    ):
        add_weighted_adapter(model, ["math", "chem"], [1, 1], "mixed", combination_type="linear")
    with refused(
        "combination_type 'dare_ties' needs a density between 0 and 1 (the fraction of each tensor kept), "
        "not None."
    ):
        add_weighted_adapter(model, ["math", "bio"], [1, 1], "mixed", combination_type="dare_ties")
    with refused("majority_sign_method 'most' is not 'total' or 'frequency'."):
        add_weighted_adapter(
            model, ["math", "bio"], [1, 1], "mixed", "ties", density=0.5, majority_sign_method="most"
        )
    with pytest.raises(ValueError, match=r"^Unknown combination_type 'sum'; choose one of \['cat', 'linear'"):
        add_weighted_adapter(model, ["math", "bio"], [1, 1], "mixed", combination_type="sum")
    with refused(
        "svd_rank 40 exceeds what the (32, 32) update of 'model.layers.0.self_attn.q_proj' has; choose at "
        "most 32."
    ):
        add_weighted_adapter(model, ["math", "bio"], [1, 1], "mixed", combination_type="svd", svd_rank=40)
    assert "mixed" not in model._peft_adapter_specs
