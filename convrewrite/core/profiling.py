"""Run a model once and record, per module call, its output shapes, parameters and MACs.

MACs (one multiply-accumulate = 1; FLOPs = 2 x MACs) are counted at the ATen level with a
TorchDispatchMode while the model runs, so functional calls (``F.conv2d``, ``@``, ``bmm``,
``F.scaled_dot_product_attention``) are never missed, whether or not torch.fx could trace the
model. Each MAC is attributed to the innermost module running at that moment, and each unique
parameter to the module that owns it, so the rows always sum to the totals. The formulas are the
textbook ones (hand-written here, checked against ``FlopCounterMode`` in the tests):

* convolution: out elements x (Cin / groups) x kernel elements; transposed convolutions are
  counted on the *input* size: in elements x (Cout / groups) x kernel elements;
* mm / addmm: n x k x m; bmm / baddbmm: b x n x k x m; linear (seen only on nested tensors):
  out elements x in features;
* scaled-dot-product attention: b x heads x Lq x Lk x (E + Ev);
* the fused fast paths of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (eval mode
  without gradients), whose GEMMs run inside one ATen call where no dispatch mode sees them:
  their projections, attention and (for the layer) feed-forward network, by the formulas above.

Bias additions, normalisation, activations and pooling are not MACs and are not counted.

A block whose work the ATen ops do not show honestly (the Winograd block's transform-domain
products are elementwise multiplies, which no formula here counts) declares its own cost: a
module with a ``count_macs(inputs, output) -> dict[kind, int]`` method is counted by that method
instead of by the ops that run inside it (its submodules then count nothing), and the kinds it
returns appear in ``macs_by_kind`` beside ``convolution`` and ``matmul``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from convrewrite.core.compare import output_shapes
from convrewrite.core.loading import ExampleInputs

aten = torch.ops.aten

CONTAINER_TYPES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _prod(values: Any) -> int:
    return int(math.prod(int(v) for v in values))


def _conv_macs(args: tuple[Any, ...], out: Any) -> int:
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    if transposed:
        # Each input element is scattered through (Cout/groups) x kernel weights.
        return _prod(x.shape[:1]) * _prod(x.shape[2:]) * _prod(w.shape)
    return _prod(out.shape) * _prod(w.shape[1:])


def _mm_macs(args: tuple[Any, ...], out: Any) -> int:
    a, b = args[0], args[1]
    return int(a.shape[0]) * int(a.shape[1]) * int(b.shape[1])


def _addmm_macs(args: tuple[Any, ...], out: Any) -> int:
    return _mm_macs(args[1:], out)


def _bmm_macs(args: tuple[Any, ...], out: Any) -> int:
    a, b = args[0], args[1]
    return int(a.shape[0]) * int(a.shape[1]) * int(a.shape[2]) * int(b.shape[2])


def _baddbmm_macs(args: tuple[Any, ...], out: Any) -> int:
    return _bmm_macs(args[1:], out)


def _sdpa_macs(args: tuple[Any, ...], out: Any) -> int:
    q, k, v = args[0], args[1], args[2]
    batch_heads = _prod(q.shape[:-2])
    lq, e = int(q.shape[-2]), int(q.shape[-1])
    lk, ev = int(k.shape[-2]), int(v.shape[-1])
    return batch_heads * lq * lk * (e + ev)


def _sequences(tokens: Any) -> list[tuple[int, int]]:
    """(batch, length) groups of a (..., L, E) token tensor; a nested tensor gives one per sequence."""
    if getattr(tokens, "is_nested", False):
        return [(1, int(sequence.shape[0])) for sequence in tokens.unbind()]
    return [(_prod(tokens.shape[:-2]), int(tokens.shape[-2]))]


def _attention_block_macs(queries: Any, keys: Any, embed_dim: int) -> int:
    """Projections and attention of multi-head attention over (batch, L, E) tokens.

    q projection Lq x E x E, k and v projections 2 x Lk x E x E, scores Lq x Lk x E (summed over
    the heads, whose dimensions add up to E), weighted values Lq x Lk x E, output projection
    Lq x E x E; per batch element.
    """
    total = 0
    for (batch, lq), (_, lk) in zip(_sequences(queries), _sequences(keys)):
        total += batch * (2 * lq * embed_dim * embed_dim + 2 * lk * embed_dim * embed_dim + 2 * lq * lk * embed_dim)
    return total


def _native_mha_macs(args: tuple[Any, ...], out: Any) -> int:
    """``aten._native_multi_head_attention``: nn.MultiheadAttention's fused fast path (eval, no grad).

    Args: query, key, value, embed_dim, num_heads, qkv_weight, ... The fused kernel runs its GEMMs
    below the dispatcher, so none of them is seen on its own.
    """
    return _attention_block_macs(args[0], args[1], int(args[3]))


def _encoder_layer_macs(args: tuple[Any, ...], out: Any) -> int:
    """``aten._transformer_encoder_layer_fwd``: nn.TransformerEncoderLayer's fused fast path.

    Args: src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
    norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ...
    Self-attention as above plus the feed-forward network: 2 x L x E x F (F = ffn_weight_1 rows).
    """
    src, embed_dim, ffn_weight = args[0], int(args[1]), args[14]
    hidden = int(ffn_weight.shape[0])
    feed_forward = sum(batch * length * 2 * embed_dim * hidden for batch, length in _sequences(src))
    return _attention_block_macs(src, src, embed_dim) + feed_forward


def _numel(tensor: Any) -> int:
    if getattr(tensor, "is_nested", False):
        return sum(part.numel() for part in tensor.unbind())
    return int(tensor.numel())


def _linear_macs(args: tuple[Any, ...], out: Any) -> int:
    """``aten.linear`` reaches the counter undecomposed only for nested tensors (the layers of an
    nn.TransformerEncoder given a padding mask in eval mode): out elements x in_features."""
    return _numel(out) * int(args[1].shape[-1])


def _op(name: str) -> Any:
    return getattr(aten, name, None)


_FORMULAS: dict[Any, tuple[str, Callable[[tuple[Any, ...], Any], int]]] = {}
for _name, _label, _fn in [
    ("convolution", "convolution", _conv_macs),
    ("_convolution", "convolution", _conv_macs),
    ("cudnn_convolution", "convolution", _conv_macs),
    ("convolution_overrideable", "convolution", _conv_macs),
    ("mm", "matmul", _mm_macs),
    ("addmm", "matmul", _addmm_macs),
    ("bmm", "matmul", _bmm_macs),
    ("baddbmm", "matmul", _baddbmm_macs),
    ("linear", "matmul", _linear_macs),
    ("_scaled_dot_product_flash_attention_for_cpu", "attention", _sdpa_macs),
    ("_scaled_dot_product_flash_attention", "attention", _sdpa_macs),
    ("_scaled_dot_product_efficient_attention", "attention", _sdpa_macs),
    ("_scaled_dot_product_cudnn_attention", "attention", _sdpa_macs),
    ("_native_multi_head_attention", "attention", _native_mha_macs),
    ("_transformer_encoder_layer_fwd", "attention", _encoder_layer_macs),
]:
    _packet = _op(_name)
    if _packet is not None:
        _FORMULAS[_packet] = (_label, _fn)

# ``aten._convolution`` / cudnn variants transpose flag sits at the same index (6) as in
# ``aten.convolution``; ``_slow_conv2d_forward`` has no such flag and is never transposed.
if _op("_slow_conv2d_forward") is not None:
    _FORMULAS[aten._slow_conv2d_forward] = (
        "convolution",
        lambda args, out: _prod(out.shape) * _prod(args[1].shape[1:]),
    )


def macs_of(func: Any, args: tuple[Any, ...], out: Any) -> tuple[str, int] | None:
    """The (kind, MACs) of one ATen call, or None when it is not a multiply-accumulate op."""
    entry = _FORMULAS.get(getattr(func, "overloadpacket", None))
    if entry is None:
        return None
    label, formula = entry
    result = out[0] if isinstance(out, (tuple, list)) else out
    return label, formula(args, result)


@dataclass
class CallRecord:
    """One call of one module (or the whole model, name ``""``)."""

    index: int
    name: str
    type: str
    depth: int
    parent: int | None
    call_number: int
    is_leaf: bool
    is_container: bool
    post_index: int = -1
    output_shapes: list[list[int]] = field(default_factory=list)
    input_shapes: list[list[int]] = field(default_factory=list)
    params: int = 0
    trainable_params: int = 0
    param_bytes: int = 0
    macs: int = 0
    macs_by_kind: dict[str, int] = field(default_factory=dict)
    called: bool = True

    @property
    def output_numel(self) -> int:
        return sum(_prod(s) for s in self.output_shapes)


@dataclass
class ModelProfile:
    """Everything one forward pass tells: per-call rows and model totals."""

    records: list[CallRecord]
    params: int
    trainable_params: int
    param_bytes: int
    buffer_bytes: int
    macs: int
    input_shapes: list[list[int]]
    output: Any = None
    _subtrees: dict[str, tuple[int, int]] | None = field(default=None, repr=False, compare=False)

    def by_name(self, name: str) -> list[CallRecord]:
        return [r for r in self.records if r.name == name]

    def first_call(self, name: str) -> CallRecord | None:
        for record in self.records:
            if record.name == name and record.called:
                return record
        return None

    def subtree_totals(self, name: str) -> tuple[int, int]:
        """(params, MACs) of the calls of module ``name`` and of every module under it."""
        if self._subtrees is None:
            # One pass, each record added to its own name and every enclosing one ("a.b.c" to
            # "a.b.c", "a.b", "a"): looking names up one by one would be quadratic in the layers.
            totals: dict[str, list[int]] = {}
            for record in self.records:
                parts = record.name.split(".") if record.name else [""]
                for end in range(1, len(parts) + 1):
                    entry = totals.setdefault(".".join(parts[:end]), [0, 0])
                    entry[0] += record.params
                    entry[1] += record.macs
            self._subtrees = {key: (value[0], value[1]) for key, value in totals.items()}
        return self._subtrees.get(name, (0, 0))


@dataclass
class _Ownership:
    params: dict[str, int]
    trainable: dict[str, int]
    bytes: dict[str, int]


def parameter_ownership(model: nn.Module) -> _Ownership:
    """Attribute each unique parameter (tied ones once) to the module that owns it first."""
    params: dict[str, int] = {}
    trainable: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for full_name, parameter in model.named_parameters(remove_duplicate=True):
        owner = full_name.rpartition(".")[0]
        params[owner] = params.get(owner, 0) + parameter.numel()
        nbytes[owner] = nbytes.get(owner, 0) + parameter.numel() * parameter.element_size()
        if parameter.requires_grad:
            trainable[owner] = trainable.get(owner, 0) + parameter.numel()
    return _Ownership(params, trainable, nbytes)


class _MacCounter(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # By default torch wraps __torch_dispatch__ in torch._disable_dynamo, whose first call
        # imports torch._dynamo: seconds of start-up for every report. The counter never runs under
        # torch.compile, so there is nothing for dynamo to skip.
        return False

    def __init__(self, stack: list[CallRecord]) -> None:
        super().__init__()
        self.stack = stack
        #: Depth of blocks with their own ``count_macs`` currently running: their ops are not counted.
        self.declared_depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.declared_depth:
            return out
        counted = macs_of(func, args, out)
        if counted is not None and self.stack:
            label, macs = counted
            record = self.stack[-1]
            record.macs += macs
            record.macs_by_kind[label] = record.macs_by_kind.get(label, 0) + macs
        return out


def declared_counter(module: nn.Module) -> Callable[[tuple[Any, ...], Any], dict[str, int]] | None:
    """The module's own ``count_macs`` method, when its class defines one."""
    method = getattr(type(module), "count_macs", None)
    if not callable(method):
        return None
    bound: Callable[[tuple[Any, ...], Any], dict[str, int]] = method.__get__(module)
    return bound


def _shapes(value: Any) -> list[list[int]]:
    return [list(shape) for shape in output_shapes(value)]


def profile(model: nn.Module, inputs: ExampleInputs) -> ModelProfile:
    """Run ``model`` once on ``inputs`` (no grad) and record every module call."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    ownership = parameter_ownership(model)
    records: list[CallRecord] = []
    stack: list[CallRecord] = []
    call_counts: dict[str, int] = {}
    post_counter = [0]
    handles = []
    counter = _MacCounter(stack)

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names.get(id(module), "?")
        number = call_counts.get(name, 0)
        call_counts[name] = number + 1
        record = CallRecord(
            index=len(records),
            name=name,
            type=type(module).__name__,
            depth=len(stack),
            parent=stack[-1].index if stack else None,
            call_number=number,
            is_leaf=not any(True for _ in module.children()),
            is_container=isinstance(module, CONTAINER_TYPES),
            input_shapes=_shapes(args),
        )
        if number == 0:
            record.params = ownership.params.get(name, 0)
            record.trainable_params = ownership.trainable.get(name, 0)
            record.param_bytes = ownership.bytes.get(name, 0)
        records.append(record)
        stack.append(record)
        if declared_counter(module) is not None:
            counter.declared_depth += 1

    def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if stack:
            record = stack.pop()
            record.output_shapes = _shapes(output)
            record.post_index = post_counter[0]
            post_counter[0] += 1
            declared = declared_counter(module)
            if declared is not None:
                counter.declared_depth -= 1
                if counter.declared_depth == 0:
                    for kind, macs in declared(args, output).items():
                        record.macs += int(macs)
                        record.macs_by_kind[kind] = record.macs_by_kind.get(kind, 0) + int(macs)

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        # No always_call: when a forward raises, the stack keeps the calls that were open, so the
        # innermost one names the layer where the input stopped fitting.
        handles.append(module.register_forward_hook(post_hook))
    try:
        with torch.no_grad(), counter:
            output = inputs.call(model)
    except Exception as exc:
        open_calls = [r for r in stack if r.name]
        if open_calls:
            innermost = open_calls[-1]
            exc._convrewrite_layer = f"{innermost.name} ({innermost.type})"  # type: ignore[attr-defined]
        raise
    finally:
        for handle in handles:
            handle.remove()

    # Parameters of modules that never ran still count: give them rows so rows sum to totals.
    called = set(call_counts)
    for name, module in model.named_modules():
        if name in called:
            continue
        if ownership.params.get(name, 0) == 0:
            continue
        records.append(
            CallRecord(
                index=len(records),
                name=name,
                type=type(module).__name__,
                depth=name.count(".") + 1,
                parent=None,
                call_number=0,
                is_leaf=not any(True for _ in module.children()),
                is_container=isinstance(module, CONTAINER_TYPES),
                params=ownership.params.get(name, 0),
                trainable_params=ownership.trainable.get(name, 0),
                param_bytes=ownership.bytes.get(name, 0),
                called=False,
            )
        )
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelProfile(
        records=records,
        params=sum(ownership.params.values()),
        trainable_params=sum(ownership.trainable.values()),
        param_bytes=sum(ownership.bytes.values()),
        buffer_bytes=buffer_bytes,
        macs=sum(r.macs for r in records),
        input_shapes=[list(t.shape) for _, t in inputs.tensors()],
        output=output,
    )
