"""``separable``: a dense KxK conv becomes a depthwise conv followed by a 1x1 pointwise conv.

Weights come from a truncated SVD per input channel: for input channel i, the slice
``W[:, i, :]`` (Cout x kernel elements) is factored as ``U S V^T`` and its best rank-m
approximation (Eckart-Young) gives m depthwise filters ``sqrt(s) v`` and m pointwise columns
``sqrt(s) u``. With m = min(Cout, kernel elements) the rewrite is exact. The depthwise part keeps the
kernel, stride, padding (``'same'`` too), dilation and padding_mode.

Bias: ``bias=both`` (default) puts a bias on both parts when the original had one, which reproduces
the CRNN document's table; ``bias=pointwise`` keeps only the pointwise bias, which loses nothing
because a depthwise bias folds into the pointwise bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from convrewrite.rules._shared import block_class_for, geometry, grouping_skip_reason
from convrewrite.rules.api import ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason


@dataclass(frozen=True)
class SeparableConfig(RuleConfig):
    multiplier: int = field(
        default=1, metadata={"help": "depthwise channel multiplier m (rank kept per input channel)"}
    )
    bias: Literal["both", "pointwise"] = field(
        default="both", metadata={"help": "where the original bias goes: both parts, or pointwise only"}
    )
    init: Literal["svd", "random"] = field(
        default="svd", metadata={"help": "svd: best rank-m transfer of the trained kernel; random: fresh init"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be a positive integer, got {self.multiplier}")


#: float64 elements of kernel slices factored at once by ``svd_factors`` (8 MiB).
_SVD_CHUNK_ELEMENTS = 1 << 20


def svd_factors(weight: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Depthwise (Cin*m, 1, *k) and pointwise (Cout, Cin*m) factors, and the energy kept.

    Row ``i*m + j`` of the depthwise weight is the j-th component of input channel i.
    """
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    elements = int(torch.tensor(kernel).prod()) if kernel else 1
    rank = min(out_channels, elements)
    kept = min(multiplier, rank)
    depthwise = torch.zeros(in_channels, multiplier, elements, dtype=torch.float64)
    pointwise = torch.zeros(out_channels, in_channels, multiplier, dtype=torch.float64)
    total = retained = 0.0
    # A few input channels at a time: float64 copies and U factors of a whole large kernel would
    # cost several times its size at once (the memory peak of rewriting a 100M-parameter network).
    step = max(1, _SVD_CHUNK_ELEMENTS // max(out_channels * elements, 1))
    for start in range(0, in_channels, step):
        stop = min(start + step, in_channels)
        slices = weight[:, start:stop].detach().to(torch.float64).permute(1, 0, *range(2, weight.dim()))
        slices = slices.reshape(stop - start, out_channels, elements)
        u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # (c,Cout,r) (c,r) (c,r,K)
        root = s[:, :kept].sqrt()
        depthwise[start:stop, :kept] = root.unsqueeze(-1) * vh[:, :kept, :]
        pointwise[:, start:stop, :kept] = (u[:, :, :kept] * root.unsqueeze(1)).permute(1, 0, 2)
        total += float((s**2).sum())
        retained += float((s[:, :kept] ** 2).sum())
    if multiplier > kept:
        # Components beyond the kernel's rank: a random depthwise filter with a zero pointwise
        # column keeps the output exact and still lets both parts learn.
        generator = torch.Generator().manual_seed(0)
        extra = torch.randn(in_channels, multiplier - kept, elements, generator=generator, dtype=torch.float64)
        depthwise[:, kept:] = extra / max(elements, 1) ** 0.5
    energy = retained / total if total > 0 else 1.0
    depthwise = depthwise.reshape(in_channels * multiplier, 1, *kernel)
    pointwise = pointwise.reshape(out_channels, in_channels * multiplier)
    return depthwise, pointwise, energy


class SeparableRule(Rule):
    name = "separable"
    summary = "dense KxK conv -> depthwise KxK + pointwise 1x1 (MobileNet), SVD weight transfer"
    config_class = SeparableConfig
    config: SeparableConfig

    def skip_reason(self, site: ConvSite) -> str | None:
        reason = common_skip_reason(site, self.config) or grouping_skip_reason(site)
        if reason:
            return reason
        if site.kernel_elements == 1:
            return "1x1 conv: nothing to separate"
        return None

    def _has_bias(self, site: ConvSite) -> tuple[bool, bool]:
        original = site.module.bias is not None
        return original and self.config.bias == "both", original

    def build(self, site: ConvSite) -> Replacement:
        conv = site.module
        depthwise_bias, pointwise_bias = self._has_bias(site)
        block_class = block_class_for("SeparableConv", site.conv_dims)
        m = self.config.multiplier
        block = block_class(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            **geometry(conv),
            multiplier=m,
            depthwise_bias=depthwise_bias,
            pointwise_bias=pointwise_bias,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        notes: dict[str, object] = {"multiplier": m, "init": self.config.init}
        if self.config.init == "svd":
            depthwise, pointwise, energy = svd_factors(conv.weight, m)
            depthwise_conv: Any = block[0]
            pointwise_conv: Any = block[1]
            with torch.no_grad():
                depthwise_conv.weight.copy_(depthwise)
                pointwise_conv.weight.copy_(pointwise.reshape(pointwise_conv.weight.shape))
                if depthwise_bias:
                    depthwise_conv.bias.zero_()
                if pointwise_bias:
                    pointwise_conv.bias.copy_(conv.bias.detach())
            notes["energy_retained"] = energy
            notes["exact"] = m >= min(site.out_channels, site.kernel_elements)
        return Replacement(block, notes)

    def cost(self, site: ConvSite) -> Cost:
        depthwise_bias, pointwise_bias = self._has_bias(site)
        m = self.config.multiplier
        mid = site.in_channels * m
        params = mid * site.kernel_elements + mid * site.out_channels
        params += mid if depthwise_bias else 0
        params += site.out_channels if pointwise_bias else 0
        positions = site.output_elements_per_channel
        macs = positions * mid * site.kernel_elements + positions * mid * site.out_channels
        return Cost(params, macs)


__all__ = ["SeparableConfig", "SeparableRule", "svd_factors"]
