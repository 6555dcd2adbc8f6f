"""Build one classifier per method (adapter, linear probe, full fine-tuning) and score it.

Adapters go on the backbone only: every target is resolved to the exact names of backbone modules before
``add_adapter`` sees it, so ``type:Linear`` or "every bias" never touches the head, which trains fully in
every method. LoRA skips grouped (depthwise) convolutions, where a low-rank update of a per-channel
kernel saves nothing.

BatchNorm running statistics stay fixed while training by default (every BatchNorm layer in eval mode):
short runs at small batch sizes leave updated statistics lagging behind the weights (EfficientNet-Lite0
fully fine-tuned on 256 PneumoniaMNIST images for 16 steps: test AUROC 0.56 with updated statistics,
0.90 with fixed ones). ``update_batchnorm_stats=True`` lets the layers that are themselves tuned
(NormTuning, full fine-tuning) update them; frozen layers never do.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from pipelines.core.evaluation import EvaluationReport, evaluate
from pipelines.core.peft import (
    BitFit,
    Bottleneck,
    LoRA,
    NormTuning,
    PromptTuning,
    adapter_specs,
    add_adapter,
    is_norm,
    set_trainable,
    spec_from_dict,
    unsupported_norm,
)
from pipelines.imaging.backbones import Backbone
from pipelines.imaging.metrics import youden_threshold
from pipelines.imaging.model import HEAD, ImageClassifier, predict_scores

__all__ = [
    "BASELINES",
    "METHOD_BASELINES",
    "default_spec",
    "resolve_targets",
    "build_classifier",
    "freeze_unadapted_batchnorm",
    "score_model",
]

METHOD_BASELINES = ("lora", "ssf", "bitfit", "norm", "bottleneck", "prompt", "ia3")
BASELINES = ("linear_probe", "full_finetune", *METHOD_BASELINES)


def default_spec(method: str, backbone: Backbone):
    """The adapter spec a baseline named after a method uses on this backbone (targets filled in)."""
    vit = backbone.family == "vit"
    if method == "lora":
        return LoRA(r=8, alpha=16, targets=backbone.targets["lora"])
    if method == "bottleneck":
        # ViTs: AdaptFormer, parallel to the whole MLP block, fed the block's input, scaled by 0.1;
        # CNNs: a parallel 1x1-style bottleneck beside each convolution
        if vit:
            return Bottleneck(targets=["re:.*mlp$"], hidden=16, placement="parallel", scale=0.1,
                              channels=backbone.token_width)  # fmt: skip
        return Bottleneck(targets=backbone.targets["bottleneck"], reduction=4, placement="parallel")
    if method == "prompt":
        if not vit:
            raise ValueError(
                "prompt tuning needs a transformer backbone (visual prompt tokens); pick another method"
            )
        return PromptTuning(
            num_tokens=4, targets=backbone.targets["prompt"], insert_at=1, channels=backbone.token_width
        )
    return spec_from_dict({"method": method, "targets": backbone.targets.get(method, [])})


def _matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    if target.startswith("type:"):
        return type(module).__name__ == target[5:]
    return name == target or name.endswith("." + target)


def resolve_targets(model: ImageClassifier, spec, backbone: Backbone):
    """Return the spec with its targets replaced by exact ``re:`` names of backbone modules.

    Empty targets mean the backbone family's defaults, except for BitFit (every bias) and NormTuning
    (every norm layer), where they mean every such layer of the backbone.
    """
    targets = list(spec.targets)
    if not targets and spec.method not in ("bitfit", "norm"):
        targets = backbone.targets.get(spec.method, [])
    chosen, unsupported = [], set()
    for name, module in model.named_modules():
        if not name.startswith("backbone."):
            continue
        local = name[len("backbone.") :]
        if not targets and isinstance(spec, BitFit):
            hit = isinstance(getattr(module, "bias", None), nn.Parameter)
        elif not targets and isinstance(spec, NormTuning):
            hit = is_norm(module)
        elif isinstance(spec, LoRA) and getattr(module, "groups", 1) > 1:
            hit = False
        else:
            hit = any(_matches(t, local, module) or _matches(t, name, module) for t in targets)
        if hit and isinstance(spec, NormTuning) and unsupported_norm(module):
            unsupported.add(type(module).__name__)
        elif hit:
            chosen.append(f"re:{re.escape(name)}")
    if unsupported and (targets or not chosen):
        raise ValueError(
            f"NormTuning cannot tune {', '.join(sorted(unsupported))} layers of backbone "
            f"'{backbone.provenance['name']}' (their forward does more than the norm, or they have "
            "nothing to tune); use ssf or bitfit on this backbone instead"
        )
    if not chosen:
        raise ValueError(
            f"the {spec.method} adapter targets {targets} match no module of backbone "
            f"'{backbone.provenance['name']}'; name its modules (e.g. q_proj, qkv, type:Conv2d)"
        )
    if isinstance(spec, PromptTuning) and spec.channels is None:
        if backbone.token_width is None:
            raise ValueError(
                "prompt tuning needs a transformer backbone (visual prompt tokens); pick another method"
            )
        return replace(spec, targets=chosen, channels=backbone.token_width)
    return replace(spec, targets=chosen)


def freeze_unadapted_batchnorm(model: nn.Module, update_stats: bool = False) -> None:
    """Put BatchNorm layers (and adapters on them) into eval mode, except, with ``update_stats``, those
    that are tuned: BatchNorm layers with trainable weights (full fine-tuning) or a NormTuning adapter."""
    batchnorm = nn.modules.batchnorm._BatchNorm
    norm_adapters = {name for name, spec in adapter_specs(model).items() if spec.method == "norm"}
    for module in model.modules():
        if hasattr(module, "adapters") and isinstance(module.base_layer, batchnorm):
            names = norm_adapters & set(module.adapters)
            tuned = any(p.requires_grad for n in names for p in module.adapters[n].parameters())
            if not (update_stats and tuned):
                module.eval()  # the base layer and the adapters' own statistics stay fixed
        elif isinstance(module, batchnorm) and not (
            update_stats and any(p.requires_grad for p in module.parameters())
        ):
            module.eval()


class _Classifier(ImageClassifier):
    """The classifier whose ``train()`` keeps BatchNorm statistics fixed (see the module docstring)."""

    update_batchnorm_stats = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            freeze_unadapted_batchnorm(self, self.update_batchnorm_stats)
        return self


def build_classifier(
    backbone: Backbone,
    method: str,
    spec,
    num_outputs: int,
    task: str,
    name: str,
    dropout: float = 0.0,
    update_batchnorm_stats: bool = False,
) -> tuple[ImageClassifier, object | None]:
    """A fresh classifier on a copy of the backbone, prepared for ``method``.

    Args:
        backbone: Loaded once; its module is deep-copied, so every method starts from the same weights.
        method: ``linear_probe``, ``full_finetune`` or ``adapter``.
        spec: The adapter spec when ``method == "adapter"``.
        num_outputs: Logits of the head.
        task: binary, multiclass or multilabel.
        name: Adapter name.
        dropout: Dropout before the head.
        update_batchnorm_stats: Let tuned BatchNorm layers update their running statistics.

    Returns:
        (model with only the parameters of the method trainable, the resolved spec or None).
    """
    copied = copy.copy(backbone)
    copied.module = copy.deepcopy(backbone.module)
    model = _Classifier(copied, num_outputs, task, dropout)
    model.update_batchnorm_stats = update_batchnorm_stats
    if method == "full_finetune":
        model.requires_grad_(True)
        return model, None
    if method == "linear_probe":
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        return model, None
    resolved = resolve_targets(model, spec, backbone)
    add_adapter(model, resolved, name=name)
    set_trainable(model, [name], extra=[HEAD])
    return model, resolved


def score_model(
    model: nn.Module,
    val_loader,
    test_loader,
    task: str,
    metrics: list[str],
    bootstrap: int,
    seed: int,
) -> tuple[EvaluationReport, tuple[np.ndarray, np.ndarray], float | None]:
    """Predict val and test; pick the binary threshold on val (Youden's J) and evaluate test with it.

    Returns:
        (test report, (y_true, y_score) on test, threshold or None).
    """
    threshold = None
    if task == "binary" and val_loader is not None:
        y_val, s_val = predict_scores(model, val_loader)
        threshold = youden_threshold(y_val, s_val)
    y_test, s_test = predict_scores(model, test_loader)
    chosen = 0.5 if threshold is None else threshold  # a chosen 0.0 (everything positive) stays 0.0
    report = evaluate(task, y_test, s_test, metrics, bootstrap=bootstrap, seed=seed, threshold=chosen)
    return report, (y_test, s_test), threshold


@torch.no_grad()
def outputs_equal(first: nn.Module, second: nn.Module, images: torch.Tensor) -> bool:
    """Whether two models give identical logits on ``images`` (eval mode)."""
    first.eval(), second.eval()
    return bool(torch.equal(first(images), second(images)))
