"""LoRA (and DoRA) adapters for Linear, Embedding, ConvNd and ConvTranspose1d layers, with their merge rules.

Adapter weights live in float32 and are cast to the activation dtype inside forward, so activations are
never upcast. On a frozen Linear, a fused autograd Function adds the low-rank products of every LoRA
adapter stacked there into the base GEMM's output and saves only the input, each rank-r projection and,
under dropout, a boolean keep mask for backward; its bf16 copies of A and B (with the scale folded in)
are cached until the optimiser changes the float32 weights. Under
autocast the fused path computes in the autocast dtype, as F.linear would: the input, and a float32
frozen weight, are cast to it first; projections that read one input in turn (q, k, v) share its cast.
PiSSA and OLoRA layers (lora_init.py) compute the same way on their residual base weight; while merged
they keep the unmerged weight, as DoRA does, so unmerging gives it back bit for bit.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .lora_init import is_residual_init
from .lora_init import start as start_residual_init
from .specs import LoRA

# Fused optimisers (AdamW(fused=True)) update parameters without bumping their version counters, so the
# cast cache also keys on a count of optimiser steps.
_OPTIMIZER_STEPS = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)

SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d)

# The last input cast to the autocast dtype: q, k and v (gate and up) read one normed x in turn, so they
# share one cast (one kernel instead of three) and save one copy for backward instead of three.
_LAST_CAST: list[tuple | None] = [None]


def _cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if x.is_inference():  # no version counter to tell an in-place change by
        return x.to(dtype)
    key = (x._version, dtype, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    last = _LAST_CAST[0]
    if last is not None and last[0]() is x and last[1] == key:
        cast = last[2]()
        if cast is not None:
            return cast
    cast = x.to(dtype)
    _LAST_CAST[0] = (weakref.ref(x), key, weakref.ref(cast))  # weak: holds no activation alive
    return cast


def _product_operands(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two factors of x when x is an elementwise product whose factors autograd already keeps.

    A gated feed-forward's down projection reads act(gate) * up; autograd saves both factors for the
    product's own backward, so saving them instead of x (and multiplying again in backward) costs no
    memory, where saving x would cost a tensor of the feed-forward width per layer.
    """
    grad_fn = x.grad_fn
    if grad_fn is None or grad_fn.name() != "MulBackward0":
        return None
    left, right = grad_fn._saved_self, grad_fn._saved_other
    if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)):
        return None
    if left.shape != x.shape or right.shape != x.shape or left.dtype != x.dtype or right.dtype != x.dtype:
        return None
    return left, right


class _FusedLoRAStack(torch.autograd.Function):
    """y = x W^T + b + sum_i (d_i(x) A_i^T)(s_i B_i)^T for a frozen W and the LoRA adapters i stacked on it
    (d_i: adapter i's dropout, or none); float32 gradients for each A_i and B_i that trains.

    Saved for backward: x (or, with `factors` from `_product_operands`, the two factors it is rebuilt
    from, bit for bit), each adapter's rank-r projection and, under dropout, its keep mask as booleans.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, factors, plan, *tensors):
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, weight, bias)
        saved = []
        for i, (p, _) in enumerate(plan):
            a_cast, b_scaled = tensors[4 * i + 2], tensors[4 * i + 3]
            if p > 0:  # the noise F.dropout draws on the CPU: the same random numbers in the same order
                keep = torch.empty_like(x).bernoulli_(1 - p).reshape(x2.shape).bool()
                u = (x2 * keep) @ a_cast.t()
                # 1/(1-p) on the GEMM's alpha, exact in any dtype (in bf16 it would round: -0.16% at 0.1)
                out.addmm_(u, b_scaled.t(), alpha=1 / (1 - p))
            else:
                keep, u = None, x2 @ a_cast.t()
                out.addmm_(u, b_scaled.t())
            saved += [u, a_cast, b_scaled, keep]
        kept = factors if factors is not None else (x,)
        ctx.save_for_backward(weight, *[t for t in saved if t is not None], *kept)
        ctx.layout = [t is not None for t in saved]
        ctx.plan, ctx.x_shape, ctx.kept = plan, x.shape, len(kept)
        ctx.dtypes = [(tensors[4 * i].dtype, tensors[4 * i + 1].dtype) for i in range(len(plan))]
        return out  # 2-D: a view made here could not be modified in place by the caller

    @staticmethod
    def backward(ctx, grad_out):
        weight, *rest = ctx.saved_tensors
        kept = rest[len(rest) - ctx.kept :]
        stored = iter(rest[: len(rest) - ctx.kept])
        saved = [next(stored) if present else None for present in ctx.layout]
        x = kept[0] if len(kept) == 1 else kept[0] * kept[1]
        x2 = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        grads: list[torch.Tensor | None] = []
        for i, (p, scaling) in enumerate(ctx.plan):
            u, a_cast, b_scaled, keep = saved[4 * i : 4 * i + 4]
            wants_a, wants_b = ctx.needs_input_grad[5 + 4 * i], ctx.needs_input_grad[6 + 4 * i]
            gb = g @ b_scaled
            rescale = 1.0 if keep is None else 1 / (1 - p)
            if grad_x is not None:
                if keep is None:
                    grad_x.addmm_(gb, a_cast)
                else:
                    grad_x.add_((gb @ a_cast) * keep, alpha=rescale)
            h = x2 if keep is None else x2 * keep
            a_dtype, b_dtype = ctx.dtypes[i]
            grad_a = None
            if wants_a:
                grad_a = (gb.t() @ h).to(a_dtype)
                if keep is not None:
                    grad_a.mul_(rescale)  # in the float32 master dtype
            # beta=0: b_scaled only gives the shape; the scales ride on the GEMM, not on kernels of their own
            grad_b = None
            if wants_b:
                grad_b = torch.addmm(b_scaled, g.t(), u, beta=0, alpha=scaling * rescale).to(b_dtype)
            grads += [grad_a, grad_b, None, None]
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, None, None, *grads


class LoRAAdapter(nn.Module):
    """The A and B factors of one LoRA adapter on one layer."""

    kind = "delta"
    mergeable = True

    def __init__(self, base: nn.Module, spec: LoRA, name: str):
        super().__init__()
        self.spec, self.r, self.scaling = spec, spec.r, spec.scaling
        self.merged = False
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self._cache: tuple | None = None
        if spec.use_dora and not isinstance(base, nn.Linear):
            raise ValueError(
                f"DoRA is supported on Linear layers only, not on {name} ({type(base).__name__})."
            )
        if is_residual_init(spec.init) and not isinstance(base, nn.Linear):
            raise ValueError(
                f"LoRA init {spec.init!r} is supported on Linear layers only, not on {name} "
                f"({type(base).__name__}); use init 'default' there."
            )
        groups = getattr(base, "groups", 1)
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, spec.r, bias=False)
            self.lora_B = nn.Linear(spec.r, base.out_features, bias=False)
        elif isinstance(base, nn.Embedding):
            self.lora_embedding_A = nn.Parameter(torch.zeros(spec.r, base.num_embeddings))
            self.lora_embedding_B = nn.Parameter(torch.zeros(base.embedding_dim, spec.r))
        elif isinstance(base, nn.ConvTranspose1d):
            if groups != 1:
                raise ValueError(
                    f"LoRA on {name}: grouped ConvTranspose1d (groups={groups}) is not supported."
                )
            self.lora_A = nn.ConvTranspose1d(
                base.in_channels, spec.r, base.kernel_size, base.stride, base.padding,
                base.output_padding, bias=False, dilation=base.dilation,
            )  # fmt: skip
            self.lora_B = nn.Conv1d(spec.r, base.out_channels, 1, bias=False)
        else:  # ConvNd; a grouped conv gets rank r per group
            conv = type(base)
            self.lora_A = conv(
                base.in_channels, spec.r * groups, base.kernel_size, base.stride, base.padding,
                base.dilation, groups=groups, bias=False, padding_mode=base.padding_mode,
            )  # fmt: skip
            self.lora_B = conv(spec.r * groups, base.out_channels, 1, groups=groups, bias=False)
        if is_residual_init(spec.init):  # factors from the base weight, taken out of it later (lora_init.py)
            start_residual_init(self, base, spec, name)
        else:
            self.reset_parameters()
        if spec.use_dora:
            with torch.no_grad():
                norm = self._combined_weight(base).norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.float())

    def reset_parameters(self) -> None:
        if hasattr(self, "lora_embedding_A"):  # as HF peft: A zero, B normal, for embeddings
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
            return
        if self.spec.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # -- weights ---------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The float32 update to the base weight, scale included, in the base weight's layout."""
        if hasattr(self, "lora_embedding_A"):
            return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        if isinstance(base, nn.Linear):
            return b @ a * self.scaling
        if isinstance(base, nn.ConvTranspose1d):  # weight (in, out, k)
            return torch.einsum("irk,or->iok", a, b[..., 0]) * self.scaling
        groups = base.groups
        a_flat = a.reshape(groups, self.r, -1)
        b_flat = b.reshape(groups, b.shape[0] // groups, self.r)
        return torch.bmm(b_flat, a_flat).reshape(base.weight.shape) * self.scaling

    def _combined_weight(self, base: nn.Module) -> torch.Tensor:
        return base.weight.float() + self.delta_weight(base)

    def merge_into(self, base: nn.Module) -> None:
        # DoRA's merge is not a plain addition, and a PiSSA/OLoRA delta is the size of the principal
        # part of W, so subtracting it again would not give the small residual back bit for bit: both
        # keep the unmerged weight while merged.
        with torch.no_grad():
            if hasattr(self, "lora_magnitude_vector"):
                combined = self._combined_weight(base)
                scale = self.lora_magnitude_vector / combined.norm(dim=1)
                self._unmerged_weight = base.weight.detach().clone()
                base.weight.copy_(combined * scale[:, None])
            else:
                if is_residual_init(self.spec.init):
                    self._unmerged_weight = base.weight.detach().clone()
                base.weight.add_(self.delta_weight(base).to(base.weight.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        with torch.no_grad():
            if hasattr(self, "_unmerged_weight"):
                base.weight.copy_(self._unmerged_weight)
                del self._unmerged_weight
            else:
                base.weight.sub_(self.delta_weight(base).to(base.weight.dtype))

    # -- forward ---------------------------------------------------------------------------------
    def fusable(self, base: nn.Module, x: torch.Tensor) -> bool:
        """Whether the fused Linear path applies: a frozen base, no DoRA (dropout, autocast or not).

        Under torch.compile the plain path is taken: Inductor fuses it better than it can trace the cache.
        """
        return (
            isinstance(base, nn.Linear)
            and not torch.compiler.is_compiling()
            and not hasattr(self, "lora_magnitude_vector")
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
        )

    def _cast_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A.weight, self.lora_B.weight
        # Copies made under inference_mode cannot be saved for backward, so they are cached apart.
        key = (a._version, b._version, dtype, a.data_ptr(), b.data_ptr(), _OPTIMIZER_STEPS[0],
               torch.is_inference_mode_enabled())  # fmt: skip
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, a.to(dtype), (b * self.scaling).to(dtype))
        return self._cache[1], self._cache[2]

    def fused_forward(self, base: nn.Linear, x: torch.Tensor, stack: tuple = ()) -> torch.Tensor:
        """The layer's output with this adapter and the fusable LoRA adapters of ``stack`` after it, in one
        autograd Function (see ``_FusedLoRAStack``)."""
        weight, bias = base.weight, base.bias
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype != torch.float64:  # autocast leaves float64 alone
            dtype = torch.get_autocast_dtype(device)
            # Casts outside the Function, so autograd takes x's gradient back to x's own dtype. A float32
            # frozen weight is cast in every forward, as autocast does; the precision policy stores it in
            # bf16 instead (core.precision).
            x = _cast_input(x, dtype) if x.dtype != dtype else x
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        plan, tensors = [], []
        for adapter in (self, *stack):
            a_cast, b_scaled = adapter._cast_weights(x.dtype)
            tensors += [adapter.lora_A.weight, adapter.lora_B.weight, a_cast, b_scaled]
            plan.append((adapter.spec.dropout if adapter.training else 0.0, adapter.scaling))
        factors = _product_operands(x) if torch.is_grad_enabled() else None
        out = _FusedLoRAStack.apply(x, weight, bias, factors, tuple(plan), *tensors)
        return out.view(*x.shape[:-1], out.shape[-1])

    def delta(self, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to the base output (DoRA's rescaling of the base output included)."""
        dtype = base_out.dtype
        if hasattr(self, "lora_embedding_A"):
            u = F.embedding(x, self.lora_embedding_A.t().to(dtype), base.padding_idx, base.max_norm,
                            base.norm_type, base.scale_grad_by_freq, base.sparse)  # fmt: skip
            return u @ self.lora_embedding_B.t().to(dtype) * self.scaling
        h = self.dropout(x).to(dtype)
        if isinstance(base, nn.Linear):
            lora = F.linear(F.linear(h, self.lora_A.weight.to(dtype)), self.lora_B.weight.to(dtype))
        else:
            lora = _conv(self.lora_B, _conv(self.lora_A, h))
        if not hasattr(self, "lora_magnitude_vector"):
            return lora * self.scaling
        with torch.no_grad():
            norm = self._combined_weight(base).norm(dim=1)
        scale = (self.lora_magnitude_vector / norm).to(dtype)
        plain = base_out if base.bias is None else base_out - base.bias.to(dtype)
        if self.spec.dropout > 0 and self.training:
            plain = F.linear(h, base.weight.to(dtype))
        return (scale - 1) * plain + scale * lora * self.scaling


def _conv(conv: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Applies a (transposed) convolution with its weight cast to the activation dtype."""
    weight = conv.weight.to(h.dtype)
    if isinstance(conv, nn.ConvTranspose1d):
        return F.conv_transpose1d(
            h, weight, None, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation
        )
    return conv._conv_forward(h, weight, None)
