"""``channelwise``: a 1x1 conv becomes a channel-wise convolution (ChannelNets, Gao, Wang, Ji 2018).

Two forms, chosen by ``groups``:

* ``groups=1`` (default), the channel-wise convolution: one kernel of ``dc`` shared weights slides
  along the channel axis with stride s = Cin/Cout ("same" zero padding on the channel axis).
  Params dc (+ Cout bias), MACs dc x Cout x positions, the paper's cost. Needs Cin a multiple of
  Cout (no expanding layers). Weight transfer is the least-squares fit of the shared kernel to the
  1x1 weights: tap t takes the mean of the original weights on its diagonal. The taps' supports are
  disjoint, so this is the orthogonal projection onto channel-wise kernels.
* ``groups=g`` > 1, the group channel-wise module (GCWM): a grouped 1x1 conv with g groups, its
  outputs interleaved, then a group channel-wise convolution (g independent kernels of dc weights,
  stride g) that fuses the groups. Params Cout*Cin/g + g*dc (+ bias). The module is bilinear, so
  there is no closed-form projection: the rule starts from kernels that undo the interleave (the
  module is then exactly the grouped conv with the block-diagonal masked projection, reported as
  ``energy_retained_grouped``) and runs ``refine`` sweeps of alternating least squares (grouped
  part given the kernels, then kernels given the grouped part), each of which can only lower the
  error. It ends on a grouped-part step, an orthogonal projection, so energy kept = 1 - error^2.

Both keep the spatial stride, padding (``'same'`` too) and padding mode of the 1x1 conv, and its
bias exactly. ``kernel=0`` picks dc = 2 x channel stride + 1 (3 when Cin = Cout; 2g + 1 for the
group form).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from convrewrite.rules._shared import block_class_for, describe_kernel, float64_weight, geometry, grouping_skip_reason
from convrewrite.rules.api import ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason


@dataclass(frozen=True)
class ChannelwiseConfig(RuleConfig):
    groups: int = field(
        default=1,
        metadata={"help": "1: channel-wise conv; g > 1: grouped 1x1 + group channel-wise fusion (GCWM)"},
    )
    kernel: int = field(default=0, metadata={"help": "channel kernel size dc; 0: 2 x channel stride + 1"})
    refine: int = field(default=10, metadata={"help": "groups > 1: alternating least-squares sweeps after the start"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.groups < 1:
            raise ValueError(f"groups must be a positive integer, got {self.groups}")
        if self.kernel < 0:
            raise ValueError(f"kernel must be >= 0 (0 picks it), got {self.kernel}")
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0, got {self.refine}")


# --------------------------------------------------------------------------- the mathematics


def channel_padding(in_channels: int, outputs_per_kernel: int, taps: int, stride: int) -> tuple[int, int]:
    """'Same' zero padding of the channel axis, TensorFlow's split (the odd pad goes after)."""
    total = max((outputs_per_kernel - 1) * stride + taps - in_channels, 0)
    return total // 2, total - total // 2


def channelwise_matrix(kernels: torch.Tensor, in_channels: int, out_channels: int, stride: int) -> torch.Tensor:
    """(Cout, Cin) matrix of a channel-wise conv with kernels (g, dc): row j*Cout/g + o reads o*s + t - pad."""
    groups, taps = kernels.shape
    per_kernel = out_channels // groups
    before, _ = channel_padding(in_channels, per_kernel, taps, stride)
    matrix = kernels.new_zeros((out_channels, in_channels))
    for j in range(groups):
        for t in range(taps):
            positions = torch.arange(per_kernel)
            columns = positions * stride + t - before
            valid = (columns >= 0) & (columns < in_channels)
            matrix[j * per_kernel + positions[valid], columns[valid]] = kernels[j, t]
    return matrix


def solve_normal_equations(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """The min-norm least-squares solution from normal equations ``gram @ x = rhs`` (gram PSD).

    Through the pseudo-inverse (eigendecomposition): taps that touch no channel, or groups a kernel
    cannot reach, make ``gram`` singular, and LAPACK's default ``gelsy`` can then return zeros.
    """
    return torch.linalg.pinv(gram, hermitian=True) @ rhs


def fit_channelwise(target: torch.Tensor, inner: torch.Tensor, groups: int, taps: int, stride: int) -> torch.Tensor:
    """Kernels (g, dc) minimizing ||channelwise_matrix(kernels) @ inner - target||_F.

    ``inner`` (K, M) is what the channel-wise conv reads (the identity when it replaces a 1x1 conv
    directly); ``target`` is (Cout, M). The prediction is linear in the kernels, so this is one
    small least-squares problem (normal equations of size dc; min-norm where singular).
    """
    rows, width = inner.shape
    out_channels = target.shape[0]
    per_kernel = out_channels // groups
    before, _ = channel_padding(rows, per_kernel, taps, stride)
    length = (per_kernel - 1) * stride + taps
    padded = inner.new_zeros((max(length, before + rows), width))
    padded[before : before + rows] = inner
    index = torch.arange(per_kernel) * stride
    windows = torch.stack([padded[index + t] for t in range(taps)])  # (dc, Cout/g, M)
    gram = torch.einsum("tpm,upm->tu", windows, windows)
    rhs = torch.einsum("tpm,jpm->tj", windows, target.reshape(groups, per_kernel, width))
    return solve_normal_equations(gram, rhs).T.contiguous()  # (g, dc)


def interleave_index(channels: int, groups: int) -> list[int]:
    """Channel p after interleaving the groups is channel (p % g) * C/g + p // g before."""
    per_group = channels // groups
    return [(p % groups) * per_group + p // groups for p in range(channels)]


@dataclass
class GroupChannelwiseFit:
    grouped: torch.Tensor  # (Cout, Cin/g): the grouped 1x1 conv's weight
    kernels: torch.Tensor  # (g, dc)
    energy_start: float
    energy: float
    sweeps: int


def fit_group_channelwise(weight: torch.Tensor, groups: int, taps: int, sweeps: int) -> GroupChannelwiseFit:
    """Grouped 1x1 + interleave + group channel-wise kernels, fitted to the dense (Cout, Cin) weight."""
    out_channels, in_channels = weight.shape
    per_out, per_in = out_channels // groups, in_channels // groups
    # The interleave is a permutation: row p of its output is row source[p] of its input.
    source = torch.tensor(interleave_index(out_channels, groups))
    inverse = torch.empty_like(source)
    inverse[source] = torch.arange(out_channels)
    before, _ = channel_padding(out_channels, per_out, taps, groups)
    total = float(weight.pow(2).sum())

    def grouped_step(kernels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Best block-diagonal part for these kernels, and its squared error.

        Column block b only meets the mixer's columns of output group b: one least-squares problem
        per group, solved through its small normal equations (min-norm where singular). For a
        least-squares solution the error is ||W_b||^2 - <G_b, A_b^T W_b>.
        """
        mixer = channelwise_matrix(kernels, out_channels, out_channels, groups)[:, inverse]  # C @ interleave
        dense = weight.new_zeros((out_channels, in_channels))
        explained = 0.0
        for b in range(groups):
            rows, columns = slice(b * per_out, (b + 1) * per_out), slice(b * per_in, (b + 1) * per_in)
            part = mixer[:, rows]
            projected = part.T @ weight[:, columns]
            solution = solve_normal_equations(part.T @ part, projected)
            dense[rows, columns] = solution
            explained += float((solution * projected).sum())
        return dense, max(total - explained, 0.0)

    # Start: kernel j picks tap j + pad, which undoes the interleave; the module is the grouped conv.
    kernels = weight.new_zeros((groups, taps))
    kernels[torch.arange(groups), torch.arange(groups) + before] = 1.0
    dense, start_error = grouped_step(kernels)
    best = (start_error, kernels, dense)
    done = 0
    for _ in range(sweeps):
        candidate = fit_channelwise(weight, dense[source], groups, taps, groups)
        norm = float(candidate.norm())
        if norm == 0.0:
            break
        candidate = candidate * (groups**0.5 / norm)  # only the product matters; keep the kernels O(1)
        candidate_dense, current = grouped_step(candidate)
        done += 1
        previous = best[0]
        if current <= previous:
            best = (current, candidate, candidate_dense)
        # Each sweep can only lower the error; stop once it no longer does so noticeably.
        if previous - current <= 1e-7 * total:
            break
    final_error, kernels, dense = best
    grouped = torch.stack(
        [dense[r, (r // per_out) * per_in : (r // per_out + 1) * per_in] for r in range(out_channels)]
    )

    def kept(squared_error: float) -> float:
        return max(0.0, 1.0 - squared_error / total) if total > 0 else 1.0

    return GroupChannelwiseFit(grouped, kernels, kept(start_error), kept(final_error), done)


# --------------------------------------------------------------------------- the rule


class ChannelwiseRule(Rule):
    name = "channelwise"
    summary = "1x1 conv -> channel-wise conv (ChannelNets); groups=g: grouped 1x1 + group channel-wise fusion"
    config_class = ChannelwiseConfig
    config: ChannelwiseConfig

    def channel_stride(self, site: ConvSite) -> int:
        if self.config.groups > 1:
            return self.config.groups
        return max(site.in_channels // max(site.out_channels, 1), 1)

    def taps(self, site: ConvSite) -> int:
        return self.config.kernel or 2 * self.channel_stride(site) + 1

    def skip_reason(self, site: ConvSite) -> str | None:
        reason = common_skip_reason(site, self.config) or grouping_skip_reason(site)
        if reason:
            return reason
        if site.kernel_elements != 1:
            return f"not a pointwise conv (kernel {describe_kernel(site)}): channel-wise convs replace 1x1 convs"
        cin, cout, g, taps = site.in_channels, site.out_channels, self.config.groups, self.taps(site)
        if g == 1:
            if cout > cin:
                return f"expands channels ({cin} -> {cout}): a channel-wise conv cannot (groups=g can)"
            if cin % cout:
                return f"in_channels={cin} is not a multiple of out_channels={cout}: no integer channel stride"
            stride = cin // cout
            if taps < stride:
                return f"kernel={taps} is shorter than the channel stride {stride}: input channels would go unread"
            return None
        for side, channels in (("in", cin), ("out", cout)):
            if channels % g:
                return f"{side}_channels={channels} is not divisible by groups={g}"
        if taps < g:
            return f"kernel={taps} is shorter than groups={g}: an output would not see every group"
        return None

    def build(self, site: ConvSite) -> Replacement:
        conv = site.module
        weight = float64_weight(conv).reshape(site.out_channels, site.in_channels)
        taps, g = self.taps(site), self.config.groups
        has_bias = conv.bias is not None
        notes: dict[str, Any] = {"groups": g, "channel_kernel": taps}
        block: Any
        if g == 1:
            stride = self.channel_stride(site)
            block_class = block_class_for("ChannelwiseConv", site.conv_dims)
            block = block_class(site.in_channels, site.out_channels, taps, 1, bias=has_bias, **geometry(conv))
            kernels = fit_channelwise(weight, torch.eye(site.in_channels, dtype=weight.dtype), 1, taps, stride)
            fitted = channelwise_matrix(kernels, site.in_channels, site.out_channels, stride)
            total = float(weight.pow(2).sum())
            notes.update(
                form="channel-wise",
                channel_stride=stride,
                energy_retained=float(fitted.pow(2).sum()) / total if total > 0 else 1.0,
            )
            grouped = None
        else:
            block_class = block_class_for("GroupChannelwiseConv", site.conv_dims)
            block = block_class(site.in_channels, site.out_channels, taps, g, bias=has_bias, **geometry(conv))
            fit = fit_group_channelwise(weight, g, taps, self.config.refine)
            kernels, grouped = fit.kernels, fit.grouped
            notes.update(
                form="group channel-wise module",
                channel_stride=g,
                energy_retained=fit.energy,
                energy_retained_grouped=fit.energy_start,
                refine_sweeps=fit.sweeps,
            )
        block = block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        channelwise = block if grouped is None else block.channelwise
        with torch.no_grad():
            channelwise.weight.copy_(kernels)
            if has_bias:
                channelwise.bias.copy_(conv.bias.detach())
            if grouped is not None:
                block.group_conv.weight.copy_(grouped.reshape(block.group_conv.weight.shape))
        return Replacement(block, notes)

    def cost(self, site: ConvSite) -> Cost:
        cin, cout, g, taps = site.in_channels, site.out_channels, self.config.groups, self.taps(site)
        bias = cout if site.module.bias is not None else 0
        positions = site.output_elements_per_channel
        if g == 1:
            return Cost(taps + bias, positions * cout * taps)
        grouped = cout * (cin // g)
        return Cost(grouped + g * taps + bias, positions * (grouped + cout * taps))


__all__ = [
    "ChannelwiseConfig",
    "ChannelwiseRule",
    "channel_padding",
    "channelwise_matrix",
    "fit_channelwise",
    "fit_group_channelwise",
    "interleave_index",
    "solve_normal_equations",
]
