"""SCT, salient channel tuning (Zhao et al. 2023): a K x K map on the K channels of largest activation norm.

As the authors' code (its ChannelAdapter): out[..., S] += scale * (out[..., S] W^T + b), S chosen per layer
as the top-K channels by the L2 norm of the layer's output over the calibration batches (with labels, the
mean over classes of each class's norm, their "class-aware" choice). W and b (optional) start at zero here,
so the adapted model starts as its base. On a Linear or an ungrouped convolution the map is a linear change
of the output, so it merges into the weight and bias (rows S of W_base become (I + scale W) W_base[S]); on
other layers it does not merge. The chosen channels are a buffer, `channel_index`, saved with the adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import output_channels
from .specs import SCT


def layer_width(base: nn.Module, spec: SCT, name: str) -> tuple[int, int]:
    """(output channels, their dimension) of a target: `spec.channels` on the last one, or the layer's own."""
    if spec.channels is not None:
        return spec.channels, -1
    return output_channels(base, name)


def tuned_count(spec: SCT, width: int, name: str) -> int:
    """K, the number of channels tuned of a layer's `width`; more than it have is refused."""
    k = spec.count(width)
    if k > width:
        raise ValueError(
            f"SCT top_k {k} exceeds the {width} output channels of {name!r}; choose a smaller top_k."
        )
    return k


def squares_except(out: torch.Tensor, keep: tuple[int, ...]) -> torch.Tensor:
    """Squares of `out` in float32, summed over every dimension not in `keep`."""
    dims = [d for d in range(out.ndim) if d not in keep]
    squares = out.detach().float().pow(2)
    return squares.sum(dim=dims) if dims else squares  # sum(dim=[]) would sum everything


def top_channels(norms: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest norms, in increasing order."""
    return torch.topk(norms, k).indices.sort().values


class SCTAdapter(nn.Module):
    """out[..., S] += scale * (W out[..., S] + b) on the layer's channel dimension."""

    kind = "transform"

    def __init__(self, base: nn.Module, spec: SCT, name: str):
        super().__init__()
        width, self.channel_dim = layer_width(base, spec, name)
        k = tuned_count(spec, width, name)
        self.merged, self.scale, self.name, self.width = False, spec.scale, name, width
        self.calibration_batches = spec.calibration_batches
        conv = isinstance(base, nn.modules.conv._ConvNd) and not isinstance(
            base, nn.modules.conv._ConvTransposeNd
        )
        self.mergeable = spec.channels is None and (
            isinstance(base, nn.Linear) or (conv and base.groups == 1)
        )
        self.sct_weight = nn.Parameter(torch.zeros(k, k))
        self.sct_bias = nn.Parameter(torch.zeros(k)) if spec.bias else None
        index = torch.full((k,), -1, dtype=torch.long)
        if spec.selected:
            if name not in spec.selected:
                raise ValueError(
                    f"The SCT spec's selected channels name no {name!r}; run "
                    "select_salient_channels(model, spec, batches) for these targets."
                )
            index = torch.tensor(sorted(spec.selected[name]), dtype=torch.long)
            if index.numel() != k or index.unique().numel() != k or index.min() < 0 or index.max() >= width:
                raise ValueError(
                    f"The SCT selected channels of {name!r} must be {k} distinct indices below {width}; "
                    f"got {spec.selected[name]}."
                )
        self.register_buffer("channel_index", index)
        self.register_buffer("sum_of_squares", torch.zeros(width, dtype=torch.float64), persistent=False)
        self.batches_seen, self.calibrated = 0, bool(spec.selected)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.calibrated = bool((self.channel_index >= 0).all())

    def _calibrate(self, out: torch.Tensor) -> None:
        dim = self.channel_dim % out.ndim
        self.sum_of_squares += squares_except(out, (dim,)).to(self.sum_of_squares)
        self.batches_seen += 1
        if self.batches_seen >= self.calibration_batches:
            totals = self.sum_of_squares.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(totals)  # every rank chooses the same channels
            self.channel_index.copy_(top_channels(totals.sqrt(), self.channel_index.numel()))
            self.calibrated = True

    def transform(self, out: torch.Tensor) -> torch.Tensor:
        if (
            not self.calibrated
        ):  # the first training-mode batches choose the channels; the output is unchanged
            if self.training:
                self._calibrate(out)
            return out
        dim = self.channel_dim % out.ndim
        index = self.channel_index
        selected = out.index_select(dim, index).movedim(dim, -1)
        bias = self.sct_bias.to(out.dtype) if self.sct_bias is not None else None
        delta = F.linear(selected, self.sct_weight.to(out.dtype), bias) * self.scale
        return out.index_add(dim, index, delta.movedim(-1, dim))

    def check_mergeable(self, base: nn.Module) -> None:
        if not self.calibrated:
            raise ValueError(f"Cannot merge SCT on {self.name!r}: its channels are not chosen yet.")
        if base.bias is None and self.sct_bias is not None and bool(self.sct_bias.any()):
            raise ValueError(
                f"Cannot merge SCT's offset into {self.name!r}: the layer has no bias (use SCT bias: false)."
            )

    def _offset(self) -> torch.Tensor | float:
        return self.sct_bias.double() if self.sct_bias is not None else 0.0

    def _map(self) -> torch.Tensor:
        k = self.sct_weight.shape[0]
        return (
            torch.eye(k, dtype=torch.float64, device=self.sct_weight.device)
            + self.scale * self.sct_weight.double()
        )

    def merge_into(self, base: nn.Module) -> None:
        self.check_mergeable(base)
        index, mapping = self.channel_index, self._map()
        with torch.no_grad():
            rows = base.weight[index].double()
            base.weight[index] = (mapping @ rows.flatten(1)).view_as(rows).to(base.weight.dtype)
            if base.bias is not None:
                bias = mapping @ base.bias[index].double() + self.scale * self._offset()
                base.bias[index] = bias.to(base.bias.dtype)

    def unmerge_from(self, base: nn.Module) -> None:
        index, mapping = self.channel_index, self._map()
        with torch.no_grad():
            rows = base.weight[index].double()
            base.weight[index] = (
                torch.linalg.solve(mapping, rows.flatten(1)).view_as(rows).to(base.weight.dtype)
            )
            if base.bias is not None:
                bias = base.bias[index].double() - self.scale * self._offset()
                base.bias[index] = torch.linalg.solve(mapping, bias).to(base.bias.dtype)
