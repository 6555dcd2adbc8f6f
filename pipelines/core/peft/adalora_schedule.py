"""AdaLoRA's rank budget, run by the training loop: HF peft's RankAllocator as a `TrainCallback`.

After each optimiser step (before gradients are zeroed), step t counting from 0, as peft's
`update_and_allocate(t)`: while t < T - tfinal every entry's importance |p * grad| is smoothed (beta1) and its
uncertainty |importance - smoothed| too (beta2); a rank's score is its E entry's smoothed importance times
uncertainty, plus the means over its row of A and its column of B. Past tinit, every delta_t steps, the ranks
scoring at or under the k-th lowest score are zeroed in E, k = initial budget - budget(t), the budget falling
cubically from the initial total rank to target_r per layer; at t = T - tfinal the target is applied and the
statistics reset; after it the final ranks stay masked. `extra_loss` adds orth_reg_weight times the mean
||A A^T - I||_F, ||B^T B - I||_F to every micro-batch's loss.
"""

from __future__ import annotations

import torch
from torch import nn

from .adalora import FACTORS, AdaLoRAAdapter, orthogonal_penalty
from .inject import adapter_specs, wrappers
from .specs import AdaLoRA


class AdaLoRASchedule:
    """The schedule of adapter `name`; `train` adds one for every trainable AdaLoRA adapter (see methods.py).

    A loop of one's own calls `on_train_begin(model, total_steps)` once, adds `extra_loss(model)` to the loss
    and calls `update_and_allocate(step)` after each optimiser step.
    """

    def __init__(self, model: nn.Module, name: str):
        self.name, self.spec = name, adapter_specs(model)[name]
        if not isinstance(self.spec, AdaLoRA):
            raise ValueError(f"Adapter {name!r} is {self.spec.method}, not adalora; it has no rank schedule.")
        self.layers: list[AdaLoRAAdapter] = [
            w.adapters[name] for _, w in wrappers(model) if name in w.adapters
        ]
        self.total_step: int | None = None

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        """Fixes T (the spec's total_step, else the run's steps) and the budgets, as peft's RankAllocator."""
        self.total_step = self.spec.total_step or total_steps
        self.spec.check_schedule(self.total_step)
        self.initial_budget = sum(layer.lora_A.shape[0] for layer in self.layers)
        self.target_budget = self.spec.target_r * len(self.layers)
        for layer in self.layers:
            layer.total_step = self.total_step  # what an HF peft config of the adapter records

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """The orthogonal regulariser, in float32 (None when its weight is zero)."""
        if self.spec.orth_reg_weight == 0:
            return None
        return self.spec.orth_reg_weight * orthogonal_penalty(self.layers)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.update_and_allocate(step)

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed after step `step`, whether ranks are pruned to it now)."""
        tinit, tfinal, total = self.spec.tinit, self.spec.tfinal, self.total_step
        if step <= tinit:
            return self.initial_budget, False
        if step > total - tfinal:
            return self.target_budget, True
        left = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.initial_budget - self.target_budget) * (left**3) + self.target_budget)
        return budget, step % self.spec.delta_t == 0

    def update_and_allocate(self, step: int) -> None:
        """Updates the importance statistics and prunes E to the budget of optimiser step `step` (from 0)."""
        if self.total_step is None:
            raise ValueError(
                f"AdaLoRA schedule of {self.name!r}: call on_train_begin(model, total_steps) first."
            )
        final = self.total_step - self.spec.tfinal
        with torch.no_grad():
            if step < final:
                self._update_importance()
                budget, due = self.budget(step)
                if due:
                    self._mask_to_budget(budget)
            elif step == final:
                self._mask_to_budget(self.target_budget)
                for layer in self.layers:
                    for key in layer.training_state:
                        getattr(layer, key).zero_()
            else:
                for layer in self.layers:
                    layer.lora_E.masked_fill_(~layer.rank_mask[:, None], 0.0)

    def _update_importance(self) -> None:
        beta1, beta2 = self.spec.beta1, self.spec.beta2
        for layer in self.layers:
            for factor in FACTORS:
                p = getattr(layer, factor)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)  # an unused layer: no importance
                now = (p * grad).abs()
                smoothed = getattr(layer, f"importance_{factor}")
                uncertainty = getattr(layer, f"uncertainty_{factor}")
                smoothed.copy_(beta1 * smoothed + (1 - beta1) * now)
                uncertainty.copy_(beta2 * uncertainty + (1 - beta2) * (now - smoothed).abs())

    def _scores(self, layer: AdaLoRAAdapter) -> torch.Tensor:
        a, e, b = (getattr(layer, f"importance_{f}") * getattr(layer, f"uncertainty_{f}") for f in FACTORS)
        a, b = a.mean(dim=1, keepdim=True), b.mean(dim=0).view(-1, 1)
        return e.view(-1) + torch.cat([a, b], dim=1).sum(dim=1)

    def _mask_to_budget(self, budget: int) -> None:
        scores = [self._scores(layer) for layer in self.layers]
        pruned = self.initial_budget - budget
        if pruned <= 0:  # nothing to prune (peft's kthvalue would fail on k = 0)
            return
        threshold = torch.kthvalue(torch.cat(scores), k=pruned)[0].item()
        for layer, score in zip(self.layers, scores, strict=True):
            drop = score <= threshold
            layer.lora_E.masked_fill_(drop[:, None], 0.0)
            layer.rank_mask.copy_(~drop)


def training_callbacks(model: nn.Module) -> list[AdaLoRASchedule]:
    """The callbacks the model's adapters need in training: a schedule per AdaLoRA adapter that trains."""
    callbacks = []
    for name, spec in adapter_specs(model).items():
        if isinstance(spec, AdaLoRA):
            schedule = AdaLoRASchedule(model, name)
            if any(p.requires_grad for layer in schedule.layers for p in layer.parameters()):
                callbacks.append(schedule)
    return callbacks
