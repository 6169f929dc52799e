"""Conv subclasses whose ``forward`` is their own: find what they really compute, or say why not.

Real libraries subclass ``nn.Conv2d`` and compute something else in ``forward``: TensorFlow's
"SAME" padding worked out from the input size at run time, weight standardization (the weight is
normalized in every call), or a conv applied to a reshaped input as a Toeplitz linear layer. A
rule that read ``.weight`` and the constructor arguments would build a block computing another
function. So the decision is made by class, never by name: a conv whose class overrides
``forward`` or ``_conv_forward``, or that carries forward hooks (``weight_norm``), is suspect until
proven otherwise, on random inputs of the shapes it was called with:

1. It computes what the stock ``nn.ConvNd.forward`` computes with its own attributes: it is offered
   to the rules unchanged.
2. Its forward is zero (or reflect/replicate/circular) padding of the input followed by one
   convolution whose result it returns: the weight, bias, stride, dilation, groups and padding of
   that call are read while it runs (a ``TorchFunctionMode``), and a plain conv with them must
   reproduce its output. The rules then see that plain conv (``ConvSite.module``; the model's own
   module is ``ConvSite.computed.original``) and the block they build gets the padding in front
   where a plain conv cannot express it (``PaddedConv``: asymmetric amounts, or TensorFlow "SAME"
   padding recomputed for every input size when the strides make it depend on the size).
3. Anything else (it reshapes its input, post-processes the result, calls several convs, was
   never called, shares its weight with another module) is skipped with the reason.

``resolve_conv_subclasses`` is what the site collection calls; ``finish_replacement`` and
``original_module`` are the two things the rewrite step needs from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from convrewrite.errors import describe
from convrewrite.layers.padding import PaddedConv, same_padding
from convrewrite.rules.api import ConvSite

STOCK_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PAD_FUNCTIONS = (F.pad, torch._C._nn.pad, torch.constant_pad_nd)
#: Distinct input shapes checked per module (a module called at many sizes is checked at a few).
_MAX_SHAPES = 4


@dataclass
class ComputedConv:
    """What a suspect conv computes, as the plain conv the rules see plus padding in front."""

    original: nn.Module
    #: "" (folded into the plain conv), "same" (TensorFlow SAME at run time) or "fixed".
    padding: str = ""
    #: F.pad amounts (last spatial dimension first) when ``padding == "fixed"``.
    amounts: tuple[int, ...] = ()
    note: str = ""

    def wrap(self, block: nn.Module, stand_in: Any) -> nn.Module:
        """``block`` (built from the plain conv) with the padding that the plain conv lacks."""
        if not self.padding:
            return block
        wrapper = PaddedConv(
            tuple(stand_in.kernel_size),
            tuple(stand_in.stride),
            tuple(stand_in.dilation),
            same=self.padding == "same",
            amounts=self.amounts,
        )
        wrapper.conv = block
        return wrapper


@dataclass
class Unresolved:
    """A suspect conv no rule may touch, and why."""

    name: str
    type: str
    reason: str


@dataclass
class _Derived:
    """One call's conv: the tensors and arguments of the single convolution the forward ran."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    #: (before, after) per spatial dimension, first dimension first.
    pads: tuple[tuple[int, int], ...]
    mode: str
    input_shape: tuple[int, ...] = field(default=())


def stock_class(module: nn.Module) -> type[nn.Module] | None:
    """The torch conv class ``module`` is an instance of (transposed convs are not considered)."""
    for cls in STOCK_CONVS:
        if isinstance(module, cls):
            return cls
    return None


def suspect_reason(module: nn.Module) -> str | None:
    """Why ``module`` may not compute what its attributes say, or None for a stock conv."""
    base = stock_class(module)
    if base is None:
        return None
    cls = type(module)
    if cls.forward is not base.forward:
        return f"{cls.__name__}.forward is not {base.__name__}.forward"
    if cls._conv_forward is not base._conv_forward:  # type: ignore[attr-defined]
        return f"{cls.__name__}._conv_forward is not {base.__name__}._conv_forward"
    if module._forward_pre_hooks or module._forward_hooks:
        return f"{cls.__name__} has forward hooks"
    return None


def original_module(site: ConvSite) -> nn.Module:
    """The model's own module behind a site (the plain stand-in's original for a conv subclass)."""
    computed = site.computed
    return computed.original if isinstance(computed, ComputedConv) else site.module


def finish_replacement(site: ConvSite, block: nn.Module, notes: dict[str, Any]) -> nn.Module:
    """The module to install for ``site``: ``block``, with the padding a conv subclass needs in front."""
    computed = site.computed
    if not isinstance(computed, ComputedConv):
        return block
    notes.setdefault("computes", computed.note)
    if computed.padding:
        notes.setdefault("block", type(block).__name__)
    return computed.wrap(block, site.module)


def resolve_conv_subclasses(
    model: nn.Module, sites: Sequence[ConvSite], input_shapes: dict[str, list[tuple[int, ...]]]
) -> tuple[list[ConvSite], list[Unresolved]]:
    """Sites with every suspect conv replaced by the plain conv it computes, or left out with a reason.

    ``input_shapes`` holds the first input's shape of every recorded call, by module name.
    """
    holders: dict[int, int] = {}
    for holder in model.modules():
        for parameter in holder._parameters.values():
            if parameter is not None:
                holders[id(parameter)] = holders.get(id(parameter), 0) + 1
    kept: list[ConvSite] = []
    unresolved: list[Unresolved] = []
    for site in sites:
        module = site.module
        suspicion = suspect_reason(module)
        if suspicion is None:
            kept.append(site)
            continue
        kind = type(module).__name__
        shapes = list(dict.fromkeys(input_shapes.get(site.name, [])))[:_MAX_SHAPES]
        if not shapes:
            reason = "it was never called on the example input, so what it computes cannot be checked"
        elif holders.get(id(module.weight), 0) > 1:
            reason = "its weight is shared with another module"
        else:
            outcome = _resolve(module, shapes)
            if outcome is None:
                kept.append(site)
                continue
            if not isinstance(outcome, str):
                stand_in, computed = outcome
                kept.append(replace(site, module=stand_in, computed=computed))
                continue
            reason = outcome
        unresolved.append(Unresolved(site.name, kind, f"{suspicion}, and {reason}: left as is"))
    return kept, unresolved


# --------------------------------------------------------------------------- checking


def _probe(module: nn.Module, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=weight.dtype).to(weight.device)


def _close(actual: Any, expected: torch.Tensor) -> bool:
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def _resolve(module: nn.Module, shapes: list[tuple[int, ...]]) -> None | str | tuple[nn.Module, ComputedConv]:
    """None: a plain conv as it is; a string: why it cannot be rewritten; else the stand-in."""
    if not module.weight.is_floating_point():
        return "its weight is not floating point"
    base = stock_class(module)
    assert base is not None
    runs: list[tuple[torch.Tensor, Any, Any, _Derived | str]] = []
    for index, shape in enumerate(shapes):
        x = _probe(module, shape, index)
        recorder = _ConvRecorder(x)
        try:
            with torch.no_grad(), recorder:
                output = module(x)
        except Exception as exc:
            return f"running it on a random input of its recorded shape {_shown(shape)} raised {describe(exc)}"
        try:
            with torch.no_grad():
                stock = base._conv_forward(module, x, module.weight, module.bias)  # type: ignore[attr-defined]
        except Exception:
            stock = None
        runs.append((x, output, stock, recorder.single_conv(output, len(shape) - 2)))
    if all(stock is not None and _close(output, stock) for _, output, stock, _ in runs):
        return None
    derived: list[_Derived] = []
    for x, output, stock, found in runs:
        if isinstance(found, str):
            plain = f"a plain conv of its weight gives {_shown(stock)}" if stock is not None else "a plain conv fails"
            return (
                f"its forward is not padding followed by one convolution ({found}); on its input "
                f"{_shown(x)} it returns {_shown(output)} where {plain}"
            )
        if not _close(output, _reference(x, found)):
            return "a plain convolution with the weight and padding it used does not reproduce its output"
        found.input_shape = tuple(x.shape)
        derived.append(found)
    return _stand_in(module, derived)


def _shown(value: Any) -> str:
    """A shape (or a tensor's shape) as 1x3x32x32; the type name of anything else."""
    if isinstance(value, torch.Tensor):
        value = tuple(value.shape)
    if isinstance(value, tuple):
        return "x".join(str(d) for d in value)
    return type(value).__name__


def _reference(x: torch.Tensor, conv: _Derived) -> torch.Tensor:
    flat = [amount for before, after in reversed(conv.pads) for amount in (before, after)]
    padded = F.pad(x, flat, mode=conv.mode) if any(flat) else x
    function = _CONV_FUNCTIONS[len(conv.pads)]
    with torch.no_grad():
        return function(padded, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _stand_in(module: nn.Module, calls: list[_Derived]) -> str | tuple[nn.Module, ComputedConv]:
    first = calls[0]
    for other in calls[1:]:
        same = (
            other.weight.shape == first.weight.shape
            and torch.allclose(other.weight, first.weight)
            and (other.bias is None) == (first.bias is None)
            and (other.bias is None or first.bias is None or torch.allclose(other.bias, first.bias))
            and (other.stride, other.dilation, other.groups, other.mode)
            == (first.stride, first.dilation, first.groups, first.mode)
        )
        if not same:
            return "the convolution it runs differs between its calls"
    kernel = tuple(int(k) for k in first.weight.shape[2:])
    dims = len(kernel)
    follows_same = all(
        conv.pads == same_padding(conv.input_shape[2:], kernel, conv.stride, conv.dilation) for conv in calls
    )
    constant = all(conv.pads == first.pads for conv in calls)
    symmetric = all(before == after for before, after in first.pads)
    strided = any(s > 1 for s in first.stride)
    notes: list[str] = []
    padding = ""
    amounts: tuple[int, ...] = ()
    folded: tuple[int, ...] = (0,) * dims
    if first.mode != "constant":
        if not (constant and symmetric):
            return f"its {first.mode} padding is not the same on both sides"
        folded = tuple(before for before, _ in first.pads)
    elif follows_same and strided:
        padding = "same"
        notes.append("TensorFlow 'SAME' padding computed from the input size: kept in front of the block (PaddedConv)")
    elif not constant:
        return "its padding changes with the input size in a way that is not TensorFlow's 'SAME'"
    elif symmetric:
        folded = tuple(before for before, _ in first.pads)
        if any(first.pads) and follows_same:
            notes.append("TensorFlow 'SAME' padding (stride 1: the same for every input size) made explicit")
    else:
        padding = "fixed"
        amounts = tuple(amount for before, after in reversed(first.pads) for amount in (before, after))
        what = (
            "TensorFlow 'SAME' padding (stride 1: the same for every input size)"
            if follows_same
            else ("asymmetric padding, as seen on the example input")
        )
        notes.append(f"{what}: kept in front of the block (PaddedConv)")
    weight = first.weight.detach()
    if not torch.equal(weight, module.weight.detach()):
        notes.append(
            "the weight it computes in forward (e.g. weight standardization) was transferred as a plain weight; "
            "the rewritten layer no longer recomputes it"
        )
    bias = first.bias.detach() if first.bias is not None else None
    stand_in = _CONV_CLASSES[dims](
        int(weight.shape[1]) * first.groups,
        int(weight.shape[0]),
        kernel,
        stride=first.stride,
        padding=folded,
        dilation=first.dilation,
        groups=first.groups,
        bias=bias is not None,
        padding_mode="zeros" if first.mode == "constant" else first.mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        stand_in.weight.copy_(weight)
        if bias is not None and stand_in.bias is not None:
            stand_in.bias.copy_(bias)
    stand_in.eval()
    note = "; ".join(notes) or "computes a plain convolution through its own forward"
    return stand_in, ComputedConv(module, padding, amounts, note)


_CONV_CLASSES: dict[int, Any] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# --------------------------------------------------------------------------- recording


@dataclass
class _Call:
    function: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


class _ConvRecorder(TorchFunctionMode):
    """Records every torch call that consumes the probe input or something computed from it."""

    def __init__(self, source: torch.Tensor) -> None:
        super().__init__()
        self.source = source
        # id -> tensor (kept alive, so an id is never reused by another tensor during the run)
        self.derived: dict[int, torch.Tensor] = {id(source): source}
        self.calls: list[_Call] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(self.derived.get(id(t)) is t for t in inputs):
            outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
            if outputs:
                self.calls.append(_Call(func, tuple(args), dict(kwargs), output))
                for tensor in outputs:
                    self.derived[id(tensor)] = tensor
        return output

    def single_conv(self, output: Any, dims: int) -> _Derived | str:
        """The forward as padding + one convolution returning ``output``, or what else it did."""
        current = self.source
        pads = [(0, 0)] * dims
        mode = "constant"
        padded = 0
        conv: _Call | None = None
        for call in self.calls:
            if conv is not None:
                return f"it runs {_name(call.function)} after the convolution"
            if call.function in _PAD_FUNCTIONS:
                found = _pad_arguments(call, current, dims)
                if isinstance(found, str):
                    return found
                amounts, call_mode = found
                if padded and (call_mode != "constant" or mode != "constant"):
                    return "it pads twice with a non-zero mode"
                mode = call_mode
                pads = [(a + c, b + d) for (a, b), (c, d) in zip(pads, amounts)]
                padded += 1
                current = call.output
            elif call.function is _CONV_FUNCTIONS.get(dims):
                if _argument(call, 0, "input") is not current:
                    return "its convolution reads something other than its (padded) input"
                conv = call
            else:
                return f"it runs {_name(call.function)} on its input"
        if conv is None:
            return "it runs no convolution on its input"
        if conv.output is not output:
            return "it does not return the convolution's result"
        weight = _argument(conv, 1, "weight")
        bias = _argument(conv, 2, "bias")
        if not isinstance(weight, torch.Tensor) or (bias is not None and not isinstance(bias, torch.Tensor)):
            return "its convolution has no tensor weight"
        kernel = tuple(int(k) for k in weight.shape[2:])
        stride = _as_tuple(_argument(conv, 3, "stride", 1), dims)
        dilation = _as_tuple(_argument(conv, 5, "dilation", 1), dims)
        groups = int(_argument(conv, 6, "groups", 1))
        padding = _argument(conv, 4, "padding", 0)
        if isinstance(padding, str):
            if padding == "valid":
                conv_pads = [(0, 0)] * dims
            else:  # "same", stride 1: torch puts the odd element of the total after
                totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
                conv_pads = [(t // 2, t - t // 2) for t in totals]
        else:
            conv_pads = [(p, p) for p in _as_tuple(padding, dims)]
        if mode != "constant" and any(conv_pads[i] != (0, 0) for i in range(dims)):
            return f"it mixes {mode} padding with zero padding"
        total = tuple((a + c, b + d) for (a, b), (c, d) in zip(pads, conv_pads))
        return _Derived(weight.detach(), None if bias is None else bias.detach(), stride, dilation, groups, total, mode)


def _name(function: Any) -> str:
    return getattr(function, "__name__", None) or repr(function)


def _argument(call: _Call, index: int, name: str, default: Any = None) -> Any:
    if index < len(call.args):
        return call.args[index]
    return call.kwargs.get(name, default)


def _as_tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)
    return values * dims if len(values) == 1 else values


def _pad_arguments(call: _Call, current: torch.Tensor, dims: int) -> tuple[list[tuple[int, int]], str] | str:
    """Per spatial dimension (before, after) and the mode of one pad call on ``current``."""
    if _argument(call, 0, "input") is not current:
        return "it pads something other than its input"
    amounts = [int(a) for a in _argument(call, 1, "pad", ())]
    if call.function is torch.constant_pad_nd:
        mode, value = "constant", _argument(call, 2, "value", 0)
    else:
        mode, value = str(_argument(call, 2, "mode", "constant")), _argument(call, 3, "value", None)
    if mode == "constant" and value not in (None, 0, 0.0):
        return f"it pads with the value {value}"
    if len(amounts) % 2 or len(amounts) > 2 * dims or any(a < 0 for a in amounts):
        return "it pads (or crops) more than its spatial dimensions"
    pads = [(0, 0)] * dims
    for pair in range(len(amounts) // 2):
        pads[dims - 1 - pair] = (amounts[2 * pair], amounts[2 * pair + 1])
    return pads, mode


__all__ = [
    "ComputedConv",
    "Unresolved",
    "finish_replacement",
    "original_module",
    "resolve_conv_subclasses",
    "stock_class",
    "suspect_reason",
]
