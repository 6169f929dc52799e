"""``low-rank``: a Linear or a dense conv becomes two thinner layers through rank r (truncated SVD).

The layer's weight is read as a matrix M of shape A x B: (out_features, in_features) for a Linear,
(Cout, Cin x kernel elements) for a conv. Its SVD ``M = U S V^T`` truncated to rank r is the best
rank-r approximation (Eckart-Young); ``sqrt(S_r) V_r^T`` becomes the first part and ``U_r sqrt(S_r)``
the second:

* Linear: ``Linear(in, r, bias=False)`` then ``Linear(r, out)``;
* conv: a KxK conv to r channels with the original kernel, stride, padding, dilation and padding
  mode, then a 1x1 conv to Cout (the channel decomposition of Zhang et al., TPAMI 2016).

The original bias goes, unchanged, on the second part. The weight costs r x (A + B) instead of
A x B, and so do the MACs per output position, so a factorisation saves parameters and MACs only
when r < A·B / (A + B); a layer where the chosen rank does not is skipped, with the numbers.

The rank: ``rank=r`` as given; ``ratio=q`` keeps about the fraction q of the layer's weights,
r = floor(q · A·B / (A + B)); ``energy=e`` takes the smallest r whose singular values keep the
fraction e of sum(s²) (the squared Frobenius norm of the weight). At most one of the three; with
none, ``ratio=0.5``. ``energy_retained`` in the notes is sum(s_r²) / sum(s²); the kernel error the
report shows is sqrt(1 - energy_retained), since truncation is an orthogonal projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convrewrite.core.modules import CONV_TYPES
from convrewrite.layers import LowRankConv1d, LowRankConv2d, LowRankLinear
from convrewrite.rules.api import ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason

#: Used when the spec gives none of rank, ratio and energy.
DEFAULT_RATIO = 0.5


@dataclass(frozen=True)
class LowRankConfig(RuleConfig):
    rank: int | None = field(default=None, metadata={"help": "keep exactly this rank r"})
    ratio: float | None = field(
        default=None,
        metadata={"help": "fraction of each layer's weights kept, r = floor(ratio*A*B/(A+B)); 0.5 if no option is set"},
    )
    energy: float | None = field(
        default=None, metadata={"help": "smallest rank keeping this fraction of the squared singular values"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [name for name in ("rank", "ratio", "energy") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of rank, ratio and energy, not {' and '.join(given)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")

    @property
    def criterion(self) -> str:
        """The rank criterion in spec form, e.g. ``energy=0.9`` or ``ratio=0.5 (default)``."""
        if self.rank is not None:
            return f"rank={self.rank}"
        if self.energy is not None:
            return f"energy={self.energy:g}"
        if self.ratio is not None:
            return f"ratio={self.ratio:g}"
        return f"ratio={DEFAULT_RATIO:g} (default)"


def weight_matrix(module: Any) -> torch.Tensor:
    """The weight as the A x B matrix the factorisation works on, on the CPU: float64 for a float64
    layer, float32 otherwise (the transfer is as exact as the layer's own precision, and float32
    halves the time of the factorisation, the bulk of this rule's cost on a large network)."""
    weight = module.weight.detach()
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    weight = weight.to(device="cpu", dtype=dtype)
    return weight.reshape(weight.shape[0], -1)


class GramSVD:
    """The SVD ``U S V^T`` of a matrix from the eigendecomposition of its smaller Gram matrix.

    On one core this is 3-10x faster than LAPACK's SVD for kernel matrices (512x4608 in float64:
    0.16 s against 1.35 s, 0.47 s on the transpose), which matters when every layer of a ResNet-50
    is factored, and only the kept components are ever projected (``factors``). The price is
    precision on the smallest singular values (the Gram matrix squares the condition number: about
    eps x s_max² absolute error on each s²), which are the ones a truncation drops; and
    ``U_r diag(S_r) V_r^T`` is still exactly the projection ``U_r U_r^T M`` of the matrix, so the
    error and the energy kept agree.
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.tall = matrix.shape[0] > matrix.shape[1]
        small = matrix.T if self.tall else matrix  # (k, n) with k <= n
        eigenvalues, vectors = torch.linalg.eigh(small @ small.T)
        order = torch.argsort(eigenvalues, descending=True)
        #: Singular values, descending (all of them).
        self.singular_values = eigenvalues[order].clamp_min(0.0).sqrt()
        self._vectors = vectors[:, order]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U_r`` (A x r), ``S_r`` (r) and ``V_r^T`` (r x B) of the first ``rank`` components."""
        small = self.matrix.T if self.tall else self.matrix
        vectors = self._vectors[:, :rank]
        singular = self.singular_values[:rank]
        projected = vectors.T @ small  # rows: s_i times the other side's singular vectors
        # Components with a (numerically) zero singular value carry nothing: zero them instead of
        # dividing by zero.
        largest = self.singular_values[:1].clamp_min(torch.finfo(singular.dtype).tiny)
        tiny = singular <= largest * 1e-12
        safe = torch.where(tiny, torch.ones_like(singular), singular)
        other = torch.where(tiny.unsqueeze(1), torch.zeros_like(projected), projected / safe.unsqueeze(1))
        if self.tall:
            return other.T, singular, vectors.T
        return vectors, singular, other


def largest_saving_rank(rows: int, columns: int) -> int:
    """The largest r with r·(rows + columns) < rows·columns (0 when no rank saves anything)."""
    return (rows * columns - 1) // (rows + columns)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r whose first r singular values keep ``energy`` of sum(s²) (1 for a zero matrix)."""
    squared = singular_values.to(torch.float64) ** 2
    total = float(squared.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(squared, 0) / total
    # A relative slack of 1e-12 so that energy=1 is met by the full rank despite rounding.
    return int((kept < energy - 1e-12).sum()) + 1


@dataclass
class _Plan:
    """The rank chosen for one layer, with the SVD it came from (None when not needed yet)."""

    rows: int
    columns: int
    rank: int
    svd: GramSVD | None = None


class LowRankRule(Rule):
    name = "low-rank"
    summary = "Linear or dense conv -> two factors through rank r (truncated SVD; KxK conv to r, then 1x1)"
    config_class = LowRankConfig
    config: LowRankConfig
    site_types = (nn.Linear, *CONV_TYPES)

    def __init__(self, config: RuleConfig | None = None) -> None:
        super().__init__(config)
        # cost() and build() of one site need the same SVD: keep the last one (the weight tensor
        # is held too, so its id cannot be reused by another tensor while the entry lives).
        self._last: tuple[torch.Tensor, int, _Plan] | None = None

    # ---------------------------------------------------------------- rank

    def plan(self, site: ConvSite) -> _Plan:
        weight = site.module.weight
        if self._last is not None and self._last[0] is weight and self._last[1] == weight._version:
            return self._last[2]
        rows = int(weight.shape[0])
        columns = int(weight.numel()) // max(rows, 1)
        svd = None
        if self.config.rank is not None:
            rank = self.config.rank
        elif self.config.energy is not None:
            svd = GramSVD(weight_matrix(site.module))
            rank = energy_rank(svd.singular_values, self.config.energy)
        else:
            ratio = self.config.ratio if self.config.ratio is not None else DEFAULT_RATIO
            rank = math.floor(ratio * rows * columns / (rows + columns))
        plan = _Plan(rows, columns, rank, svd)
        self._last = (weight, weight._version, plan)
        return plan

    # ---------------------------------------------------------------- the rule

    def skip_reason(self, site: ConvSite) -> str | None:
        reason = common_skip_reason(site, self.config)
        if reason:
            return reason
        module = site.module
        if isinstance(module, nn.Linear) and site.calls == 0:
            # nn.MultiheadAttention reads out_proj.weight without calling out_proj; so may a model
            # that uses a Linear's weight elsewhere. Swapping the module would break that code.
            return "never called as a module on the example input (its weight may be read directly): left as is"
        if isinstance(module, nn.Conv3d) and type(module) is nn.Conv3d:
            return "Conv3d: low-rank factorises Linear, Conv1d and Conv2d layers"
        if type(module) not in (nn.Linear, nn.Conv1d, nn.Conv2d):
            # A subclass may not compute a plain linear map (TF-style padding, weight standardisation).
            parent = type(module).__mro__[1].__name__
            return f"{type(module).__name__} is a subclass of {parent}: its forward may differ"
        if not isinstance(module, nn.Linear) and module.groups > 1:
            return f"grouped conv (groups={module.groups}): not factorised"
        plan = self.plan(site)
        shape = f"{plan.rows}x{plan.columns}"
        if plan.rank == 0:
            return f"{self.config.criterion} gives rank 0 for the {shape} weight"
        limit = largest_saving_rank(plan.rows, plan.columns)
        if plan.rank > limit:
            full = min(plan.rows, plan.columns)
            saving = f"only ranks up to {limit} save parameters" if limit else "no rank saves parameters"
            return (
                f"no saving: {self.config.criterion} needs rank {plan.rank} of {full} for the {shape} weight, "
                f"and {saving} (r*({plan.rows}+{plan.columns}) < {plan.rows}*{plan.columns})"
            )
        return None

    def build(self, site: ConvSite) -> Replacement:
        module = site.module
        plan = self.plan(site)
        rank = plan.rank
        has_bias = module.bias is not None
        block: nn.Sequential
        if isinstance(module, nn.Linear):
            block = LowRankLinear(module.in_features, module.out_features, rank, bias=has_bias)
        else:
            block_class = LowRankConv1d if site.conv_dims == 1 else LowRankConv2d
            block = block_class(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                rank,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                padding_mode=module.padding_mode,
                bias=has_bias,
            )
        block = block.to(device=module.weight.device, dtype=module.weight.dtype)
        svd = plan.svd if plan.svd is not None else GramSVD(weight_matrix(module))
        u, singular, vh = svd.factors(rank)
        root = singular.sqrt()
        first: Any = block[0]
        second: Any = block[1]
        with torch.no_grad():
            first.weight.copy_((root.unsqueeze(1) * vh).reshape(first.weight.shape))
            second.weight.copy_((u * root).reshape(second.weight.shape))
            if has_bias:
                second.bias.copy_(module.bias.detach())
        squared = svd.singular_values.to(torch.float64) ** 2
        total = float(squared.sum())
        energy = float(squared[:rank].sum()) / total if total > 0 else 1.0
        notes: dict[str, Any] = {
            "rank": rank,
            "full_rank": min(plan.rows, plan.columns),
            "criterion": self.config.criterion,
            "energy_retained": energy,
            "exact": energy >= 1.0 - 1e-12,
        }
        self._last = None  # built: the SVD is not needed again
        return Replacement(block, notes)

    def cost(self, site: ConvSite) -> Cost:
        plan = self.plan(site)
        rank = plan.rank
        params = rank * (plan.rows + plan.columns) + (plan.rows if site.module.bias is not None else 0)
        # Both parts run at the output positions (the 1x1 conv has stride 1), each output position
        # costs r x B for the first part and A x r for the second.
        macs = site.output_elements_per_channel * rank * (plan.rows + plan.columns)
        return Cost(params, macs)


__all__ = [
    "DEFAULT_RATIO",
    "LowRankConfig",
    "LowRankRule",
    "energy_rank",
    "largest_saving_rank",
    "GramSVD",
    "weight_matrix",
]
