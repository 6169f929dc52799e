"""Comparing model outputs: one place for "same shapes?", "close enough?" and "how far?".

The trace check, the rewrite verification, the fidelity stage and ``apply``'s reload check all
compare the tensors of two outputs (any pytree: a tensor, a tuple, a dict of tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape; for a nested tensor (nn.TransformerEncoder with a padding mask in eval mode
    passes them between its layers) the padded shape, as it has no single size."""
    if tensor.is_nested:
        sizes = [tuple(part.shape) for part in tensor.unbind()]
        return (len(sizes), *(max(dims) for dims in zip(*sizes))) if sizes else (0,)
    return tuple(tensor.shape)


def output_shapes(value: Any) -> list[tuple[int, ...]]:
    """The shape of every tensor in ``value``, in pytree order."""
    return [shape_of(t) for t in tensor_leaves(value)]


def same_structure(a: Any, b: Any) -> bool:
    """True when both outputs hold as many tensors, of the same shapes."""
    return output_shapes(a) == output_shapes(b)


def outputs_close(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Floating tensors within ``allclose`` tolerance, integer tensors equal, same structure."""
    left, right = tensor_leaves(a), tensor_leaves(b)
    if len(left) != len(right):
        return False
    for x, y in zip(left, right):
        if x.shape != y.shape:
            return False
        if x.is_floating_point() or x.is_complex():
            if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
                return False
        elif not torch.equal(x, y):
            return False
    return True


#: The reload check's tolerance: each floating output tensor may differ by at most this fraction
#: of its own largest magnitude (see ``scaled_difference``).
RELOAD_TOLERANCE = 1e-5


def scaled_difference(expected: Any, actual: Any) -> float:
    """The worst, over the floating output tensors, of ``max|actual - expected| / max|expected|``.

    Two float paths that compute the same function (a standardized weight folded once instead of
    in every call, a 3x3 split into depthwise and pointwise) round differently; where an output
    element is a sum of large terms that nearly cancel, its error is set by those terms, not by
    its own small value, so an element-wise ``rtol`` rejects exact rewrites. Scaling by the
    tensor's largest magnitude measures the error against what the tensor holds. An all-zero
    expected tensor must be matched exactly; non-floating tensors must be equal (else inf).
    """
    worst = 0.0
    for x, y in zip(tensor_leaves(expected), tensor_leaves(actual)):
        if not x.numel():
            continue
        if not (x.is_floating_point() or x.is_complex()):
            if not torch.equal(x, y):
                return float("inf")
            continue
        x64, y64 = x.detach().to(torch.float64), y.detach().to(torch.float64)
        difference = float((y64 - x64).abs().max())
        if difference != difference:  # NaN where the other is not
            if not torch.equal(torch.isnan(x64), torch.isnan(y64)):
                return float("inf")
            finite = ~torch.isnan(x64)
            difference = float((y64[finite] - x64[finite]).abs().max()) if finite.any() else 0.0
        scale = float(x64[torch.isfinite(x64)].abs().max()) if torch.isfinite(x64).any() else 0.0
        if difference == 0.0:
            continue
        worst = max(worst, difference / scale if scale > 0 else float("inf"))
    return worst


def max_abs_difference(a: Any, b: Any) -> float:
    """The largest absolute difference over every floating tensor (0.0 when there are none)."""
    worst = 0.0
    for x, y in zip(tensor_leaves(a), tensor_leaves(b)):
        if x.numel() and (x.is_floating_point() or x.is_complex()):
            worst = max(worst, float((x.detach() - y.detach()).abs().max()))
    return worst


@dataclass
class OutputAgreement:
    """Accumulated distance between a reference output and a candidate, over one or more batches.

    Sums are kept in float64, so a figure over many batches equals the figure over their
    concatenation: relative error ``||b - a|| / ||a||`` and cosine similarity of the flattened
    outputs, the largest absolute difference, and top-1 agreement where the output is (N, classes).
    """

    squared_reference: float = 0.0
    squared_candidate: float = 0.0
    squared_difference: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    samples: int = 0
    top1_same: int = 0
    top1_total: int = 0

    def add(self, reference: Any, candidate: Any, samples: int = 1) -> None:
        left = [t.detach().to(torch.float64).flatten() for t in tensor_leaves(reference)]
        right = [t.detach().to(torch.float64).flatten() for t in tensor_leaves(candidate)]
        self.samples += samples
        if not left:
            return
        a, b = torch.cat(left), torch.cat(right)
        self.squared_reference += float(a.dot(a))
        self.squared_candidate += float(b.dot(b))
        self.squared_difference += float((b - a).dot(b - a))
        self.dot += float(a.dot(b))
        if a.numel():
            self.max_abs = max(self.max_abs, float((b - a).abs().max()))
        first_a, first_b = tensor_leaves(reference)[0], tensor_leaves(candidate)[0]
        if is_class_scores(first_a) and first_b.shape == first_a.shape:
            self.top1_same += int((first_a.argmax(dim=1) == first_b.argmax(dim=1)).sum())
            self.top1_total += int(first_a.shape[0])

    @property
    def relative_error(self) -> float:
        norm = self.squared_reference**0.5
        diff = self.squared_difference**0.5
        if norm > 0:
            return diff / norm
        return 0.0 if diff == 0 else float("inf")

    @property
    def cosine_similarity(self) -> float:
        denominator = (self.squared_reference * self.squared_candidate) ** 0.5
        if denominator > 0:
            return self.dot / denominator
        return 1.0 if self.squared_difference == 0 else 0.0

    @property
    def agreement(self) -> float | None:
        return self.top1_same / self.top1_total if self.top1_total else None


def is_class_scores(tensor: torch.Tensor) -> bool:
    """An output shaped (N, classes) with at least two classes: logits or probabilities."""
    return tensor.dim() == 2 and tensor.shape[1] >= 2 and tensor.is_floating_point()


def agreement_of(reference: Any, candidate: Any) -> OutputAgreement:
    """The agreement of one pair of outputs."""
    result = OutputAgreement()
    result.add(reference, candidate)
    return result
