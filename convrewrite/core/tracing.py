"""Trace a model with torch.fx, falling back instead of crashing.

Real models break ``symbolic_trace`` (data-dependent control flow, ``len`` of a proxy, ...). The
tracer records the innermost submodule whose forward raised, marks it as a leaf and tries again,
so every conv outside it still appears in the graph and the convs inside it can still be swapped
module by module. Only when the root's own forward is untraceable is there no graph at all
("eager" mode). Replacement blocks are always leaves, like timm's registered FX leaf modules.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from convrewrite.errors import describe

#: Module classes that tracing must never enter (the replacement blocks register here).
_leaf_classes: set[type[nn.Module]] = set()


def register_leaf_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: FX treats instances as a single call (their source is emitted whole)."""
    _leaf_classes.add(cls)
    return cls


def is_registered_leaf(module: nn.Module) -> bool:
    """A class registered here, or a replacement block (``convrewrite.layers.registry``)."""
    from convrewrite.layers.registry import registered_blocks

    if isinstance(module, registered_blocks()):
        return True
    return isinstance(module, tuple(_leaf_classes)) if _leaf_classes else False


@dataclass
class LeafInfo:
    name: str
    type: str
    reason: str


@dataclass
class TraceResult:
    """How the model was traced: ``fx`` (whole graph), ``fx+leaves`` or ``eager`` (no graph)."""

    graph_module: fx.GraphModule | None
    mode: str
    leaves: list[LeafInfo] = field(default_factory=list)
    failure: str | None = None
    #: How the graph was checked against the model: "outputs", "module calls", or "" (not yet).
    checked: str = ""
    #: Forward arguments the graph was traced with fixed to their defaults (no example input gave
    #: them): the graph, and the generated model.py, only accept these values.
    specialized: dict[str, Any] = field(default_factory=dict)

    @property
    def leaf_names(self) -> set[str]:
        return {leaf.name for leaf in self.leaves}

    def describe(self) -> str:
        fixed = ""
        if self.specialized:
            values = ", ".join(f"{name}={value!r}" for name, value in self.specialized.items())
            fixed = f" with forward arguments fixed to their defaults ({values})"
        if self.mode == "fx":
            return f"traced with torch.fx{fixed}"
        if self.mode == "fx+leaves":
            names = ", ".join(f"{leaf.name} ({leaf.type})" for leaf in self.leaves)
            return f"traced with torch.fx{fixed}; untraceable submodules kept as leaves: {names}"
        return f"not traceable with torch.fx ({self.failure}); analysed by running the model eagerly"


class _FailingModule(Exception):
    pass


class LeafAwareTracer(fx.Tracer):
    """A tracer with extra leaves by qualified name, which also notes where tracing failed."""

    def __init__(self, leaf_names: set[str]) -> None:
        super().__init__()
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or is_registered_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # The first (innermost) module to see the exception is the one whose forward failed.
            if not hasattr(exc, "_convrewrite_failing_module"):
                try:
                    name = self.path_of_module(m)
                except NameError:
                    name = ""
                exc._convrewrite_failing_module = name  # type: ignore[attr-defined]
            raise


class _ModuleState:
    """The plain state of every module (``__dict__``, and the contents of its dicts, lists and sets).

    Tracing runs the model's Python code on proxies. Code that caches or counts in plain attributes
    (a per-device cache of a gathered attention bias, a call counter) then keeps proxies of that
    trace in the model; a later trace (the retry with leaves, or the re-trace after a rewrite)
    reads them back and builds a graph whose nodes point into another graph ("Argument 'getitem_6'
    of Node 'add' does not belong to this Graph"), and an eager run would meet them too. fx also
    stores the tensor constants it meets on the root (``_tensor_constant0``). Restoring this state
    after every attempt keeps tracing free of side effects on the model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        for module in model.modules():
            attributes = dict(vars(module))
            contents = {key: _shallow_copy(value) for key, value in attributes.items() if _is_container(value)}
            self.saved.append((module, attributes, contents))

    def restore(self) -> None:
        for module, attributes, contents in self.saved:
            current = vars(module)
            for key in [key for key in current if key not in attributes]:
                del current[key]
            for key, value in attributes.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
            for key, copy in contents.items():
                _restore_contents(attributes[key], copy)


_MISSING = object()


def _is_container(value: Any) -> bool:
    return type(value) in (dict, list, set) or isinstance(value, OrderedDict)


def _shallow_copy(value: Any) -> Any:
    return list(value.items()) if isinstance(value, dict) else list(value)


def _restore_contents(container: Any, copy: list[Any]) -> None:
    """Put a dict, list or set back to the items it held, in place (others may hold it too)."""
    if isinstance(container, dict):
        if len(container) == len(copy) and all(container.get(k, _MISSING) is v for k, v in copy):
            return
        container.clear()
        container.update(copy)
    elif isinstance(container, list):
        if len(container) != len(copy) or any(a is not b for a, b in zip(container, copy)):
            container[:] = copy
    elif len(container) != len(copy) or any(item not in container for item in copy):
        container.clear()
        container.update(copy)


#: Default values fx can specialize with a guard (``torch._assert`` / ``_assert_is_none``).
_SPECIALIZABLE = (bool, int, float, str, type(None))


def default_arguments(model: nn.Module, inputs: Any) -> dict[str, Any]:
    """Forward parameters that have a default and get no value from ``inputs`` (an ExampleInputs).

    A flag such as ``forward(x, embed=False)`` is a constant of the analysis: tracing it as an
    input makes ``if embed:`` untraceable and the root falls back to eager mode. These are traced
    with fx's ``concrete_args`` instead.
    """
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    given_positional = len(getattr(inputs, "args", ()))
    given_names = set(getattr(inputs, "kwargs", {}))
    fixed: dict[str, Any] = {}
    for index, parameter in enumerate(parameters):
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        positional = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        if (positional and index < given_positional) or parameter.name in given_names:
            continue
        if parameter.default is inspect.Parameter.empty or type(parameter.default) not in _SPECIALIZABLE:
            continue
        fixed[parameter.name] = parameter.default
    return fixed


def _name_placeholders_after_parameters(graph: fx.Graph, fixed: dict[str, Any]) -> None:
    """fx names a specialized placeholder ``embed_1``; give the generated signature ``embed`` back."""
    for node in graph.nodes:
        if node.op == "placeholder" and isinstance(node.target, str):
            base, _, suffix = node.target.rpartition("_")
            if base in fixed and suffix.isdigit():
                node.target = base


def trace(
    model: nn.Module, leaf_names: set[str] | None = None, concrete_args: dict[str, Any] | None = None
) -> TraceResult:
    """Symbolically trace ``model``; on failure retry with the failing submodules as leaves.

    ``concrete_args`` (see ``default_arguments``) fixes forward arguments to constant values.
    Every attempt leaves the model's state as it found it (see ``_ModuleState``).
    """
    leaves: dict[str, LeafInfo] = {}
    fixed = set(leaf_names or ())
    specialized = dict(concrete_args or {})
    module_types = {name: type(m).__name__ for name, m in model.named_modules()}
    for _ in range(len(module_types) + 1):
        tracer = LeafAwareTracer(fixed | set(leaves))
        state = _ModuleState(model)
        try:
            graph = tracer.trace(model, concrete_args=specialized or None)
            _name_placeholders_after_parameters(graph, specialized)
        except Exception as exc:
            state.restore()
            failing = getattr(exc, "_convrewrite_failing_module", "")
            if not failing or failing in leaves or failing in fixed:
                return TraceResult(None, "eager", list(leaves.values()), failure=describe(exc))
            leaves[failing] = LeafInfo(failing, module_types.get(failing, "?"), describe(exc))
            continue
        name = type(model).__name__
        try:
            graph_module = fx.GraphModule(tracer.root, graph, name)
            # A graph that points into another one must never be accepted, even when nothing runs it.
            graph_module.graph.lint()
        except Exception as exc:
            # fx can write code that does not compile: a submodule named after a Python keyword
            # (a ModuleDict key "class") becomes ``self.heads.class``.
            failure = f"the traced graph does not compile ({describe(exc)})"
            return TraceResult(None, "eager", list(leaves.values()), failure=failure)
        finally:
            state.restore()
        for fixed_name in sorted(fixed):
            if fixed_name not in leaves and fixed_name in module_types:
                leaves[fixed_name] = LeafInfo(
                    fixed_name, module_types[fixed_name], "kept as a leaf from the original trace"
                )
        mode = "fx+leaves" if leaves else "fx"
        return TraceResult(graph_module, mode, list(leaves.values()), specialized=specialized)
    return TraceResult(None, "eager", list(leaves.values()), failure="tracing did not converge")


def placeholder_values(graph_module: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Positional values for the graph's placeholders from a call's args and kwargs."""
    values: list[Any] = []
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        name = str(node.target).lstrip("*")
        if index < len(args):
            values.append(args[index])
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])
        else:
            raise TypeError(f"no value for input {name!r}")
    return values


def torch_function_name(target: Any) -> str:
    """A short readable name for a call_function / call_method target."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", repr(target))
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if module.startswith("torch"):
        return f"torch.{name}"
    if module == "_operator":
        return f"operator.{name}"
    return name


__all__ = [
    "LeafAwareTracer",
    "default_arguments",
    "LeafInfo",
    "TraceResult",
    "is_registered_leaf",
    "placeholder_values",
    "register_leaf_module",
    "torch_function_name",
    "trace",
]

_ = torch  # torch is imported for its side effects on fx (operator registrations)
