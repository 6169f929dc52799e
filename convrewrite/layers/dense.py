"""The dense kernel that a module is equivalent to, and how far a rewrite moved from it.

Every replacement block can tell its equivalent dense kernel (``to_dense()``). Plain convs expand
their groups into a block-diagonal kernel. With that one function, a single generic test proves
exactness wherever a rewrite should be exact, and one number per layer, the relative kernel error
``||W_new - W_old||_F / ||W_old||_F``, tells users how much a rewrite approximated.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_dense_kernel(conv: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a plain conv with its groups expanded to a dense (Cout, Cin, *k) kernel."""
    weight = conv.weight.detach()
    groups = int(conv.groups)
    if groups == 1:
        dense = weight.clone()
    else:
        out_channels, in_per_group = weight.shape[0], weight.shape[1]
        out_per_group = out_channels // groups
        kernel = tuple(weight.shape[2:])
        # Block g of the (group, out, group, in) view is group g's weight; the rest stays zero: a
        # product with the groups' identity (no indexed write, so torch.func.vmap can batch it).
        grouped = weight.reshape(groups, out_per_group, 1, in_per_group, -1)
        identity = torch.eye(groups, dtype=weight.dtype, device=weight.device).reshape(groups, 1, groups, 1, 1)
        dense = (grouped * identity).reshape(out_channels, groups * in_per_group, *kernel)
    bias = conv.bias.detach().clone() if conv.bias is not None else None
    return dense, bias


def dense_kernel(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The equivalent dense (weight, bias) of a conv, a Linear or any block with ``to_dense()``."""
    to_dense = getattr(module, "to_dense", None)
    if callable(to_dense):
        weight, bias = to_dense()
        return weight, bias
    if isinstance(module, _CONV_TYPES):
        return conv_dense_kernel(module)
    if isinstance(module, nn.Linear):
        return module.weight.detach().clone(), module.bias.detach().clone() if module.bias is not None else None
    raise TypeError(f"{type(module).__name__} has no equivalent dense kernel (no to_dense())")


def compose_pointwise(
    outer: tuple[torch.Tensor, torch.Tensor | None], inner: tuple[torch.Tensor, torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense kernel of ``inner`` (any kernel) followed by ``outer`` (a 1x1, stride-1 map)."""
    outer_w, outer_b = outer
    inner_w, inner_b = inner
    matrix = outer_w.reshape(outer_w.shape[0], outer_w.shape[1])
    weight = torch.einsum("oc,ci...->oi...", matrix, inner_w)
    bias: torch.Tensor | None = None
    if inner_b is not None:
        bias = matrix @ inner_b
    if outer_b is not None:
        bias = outer_b.clone() if bias is None else bias + outer_b
    return weight, bias


#: Elements converted to float64 at once by ``relative_error`` (8 MiB).
_CHUNK_ELEMENTS = 1 << 20


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| in float64 (0 when both are zero).

    Summed chunk by chunk: float64 copies of a large kernel and of the difference would cost
    several times its size at once.
    """
    approx_flat, exact_flat = approx.detach().reshape(-1), exact.detach().reshape(-1)
    squared_difference = squared_exact = 0.0
    for start in range(0, exact_flat.numel(), _CHUNK_ELEMENTS):
        a = approx_flat[start : start + _CHUNK_ELEMENTS].to(torch.float64)
        e = exact_flat[start : start + _CHUNK_ELEMENTS].to(torch.float64)
        squared_difference += float(torch.linalg.vector_norm(a - e)) ** 2
        squared_exact += float(torch.linalg.vector_norm(e)) ** 2
    if squared_exact == 0.0:
        return 0.0 if squared_difference == 0.0 else float("inf")
    return math.sqrt(squared_difference / squared_exact)


def kernel_error(new: nn.Module, original: nn.Module) -> float:
    """Relative Frobenius error between the dense kernels of ``new`` and ``original``."""
    new_weight, _ = dense_kernel(new)
    old_weight, _ = dense_kernel(original)
    if new_weight.shape != old_weight.shape:
        raise ValueError(f"dense kernels differ in shape: {tuple(new_weight.shape)} vs {tuple(old_weight.shape)}")
    return relative_error(new_weight, old_weight)
