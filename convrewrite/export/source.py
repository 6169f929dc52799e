"""Write a rewritten model as readable, standalone PyTorch source.

The generated ``model.py`` holds one ``nn.Module`` class whose ``__init__`` builds every submodule
at its qualified name (so state_dict keys are the model's own) and whose ``forward`` is the code of
the traced graph. torch.nn layers are written as constructor calls (``nn.Conv2d(64, 128, ...)``),
checked by building them on the meta device and comparing; the replacement blocks' source is
copied in (it depends on torch alone). User classes are needed only where tracing could not see
inside them (the untraceable leaves, or a root whose forward cannot be traced); then ``model.py``
loads them from a copy of the user's source file written next to it, and says so at the top.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import keyword
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import fx, nn

from convrewrite.errors import ModelError
from convrewrite.layers.registry import block_info, module_is_standalone

_SIGNATURE_SKIP = {"self", "device", "dtype", "factory_kwargs"}
_LITERAL_TYPES = (int, float, bool, str, type(None))


@dataclass
class GeneratedSource:
    text: str
    class_name: str
    user_source: Path | None = None
    user_source_copy_name: str | None = None
    user_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _is_literal(value: Any) -> bool:
    if isinstance(value, _LITERAL_TYPES):
        return not (isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))))
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_literal(v) for k, v in value.items())
    return isinstance(value, (torch.dtype, torch.Size))


def _literal(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Size):
        return repr(tuple(value))
    if isinstance(value, float):
        return repr(value)
    return repr(value)


def _attribute_target(parent: str, name: str) -> str:
    if name.isidentifier() and not keyword.iskeyword(name):
        return f"{parent}.{name}"
    return f'getattr({parent}, "{name}")'


def _assignment(target: str, value: str) -> str:
    """``target = value``; a ``getattr(parent, "0")`` target (a child named by an index, as in
    ``nn.Sequential``) is not assignable, so it becomes ``setattr(parent, "0", value)``."""
    match = re.fullmatch(r'getattr\((.*), "([^"]*)"\)', target)
    if match:
        return f'setattr({match.group(1)}, "{match.group(2)}", {value})'
    return f"{target} = {value}"


def _module_signature(module: nn.Module) -> tuple[Any, ...]:
    """What must match for a constructor call to stand for ``module`` (own part only)."""
    own = sorted(
        (
            name,
            tuple(t.shape),
            t.dtype,
            isinstance(t, nn.Parameter),
            t.requires_grad if isinstance(t, nn.Parameter) else None,
        )
        for name, t in [*module._parameters.items(), *module._buffers.items()]
        if t is not None
    )
    none_slots = sorted(name for name, t in [*module._parameters.items(), *module._buffers.items()] if t is None)
    return (type(module), module.extra_repr(), tuple(own), tuple(none_slots), tuple(module._modules))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: The statement fx puts before ``def forward`` for each function wrapped with ``torch.fx.wrap``.
_WRAP_STATEMENT = re.compile(r'^torch\.fx\._symbolic_trace\.wrap\("([A-Za-z_][A-Za-z0-9_]*)"\)\n', re.MULTILINE)

#: What every ``nn.Module`` keeps in its ``__dict__`` itself (hooks, parameter tables): never a
#: plain attribute of the class.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}


def _recurrent_arguments(module: nn.Module) -> dict[str, Any]:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` take ``*args, **kwargs``: their arguments are
    ``RNNBase``'s, less ``mode`` (the class fixes it; ``nn.RNN`` names it by its nonlinearity)."""
    arguments = {
        name: getattr(module, name)
        for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
    }
    if isinstance(module, nn.LSTM):
        arguments["proj_size"] = module.proj_size
    if isinstance(module, nn.RNN):
        arguments["nonlinearity"] = module.nonlinearity
    return arguments


def _attention_arguments(module: nn.Module) -> dict[str, Any]:
    """``nn.MultiheadAttention`` keeps ``bias`` and ``add_bias_kv`` only as (absent) tensors."""
    assert isinstance(module, nn.MultiheadAttention)
    return {
        "embed_dim": module.embed_dim,
        "num_heads": module.num_heads,
        "dropout": module.dropout,
        "bias": module.out_proj.bias is not None,
        "add_bias_kv": module.bias_k is not None,
        "add_zero_attn": module.add_zero_attn,
        "kdim": module.kdim,
        "vdim": module.vdim,
        "batch_first": module.batch_first,
    }


def _transformer_layer_arguments(module: nn.Module) -> dict[str, Any]:
    """Transformer encoder and decoder layers keep their arguments in their children."""
    attention = module.self_attn
    linear1 = module.linear1
    assert isinstance(attention, nn.MultiheadAttention) and isinstance(linear1, nn.Linear)
    return {
        "d_model": attention.embed_dim,
        "nhead": attention.num_heads,
        "dim_feedforward": linear1.out_features,
        "dropout": module.dropout.p,
        "activation": module.activation,
        "layer_norm_eps": module.norm1.eps,
        "batch_first": attention.batch_first,
        "norm_first": module.norm_first,
        "bias": linear1.bias is not None,
    }


def _constructor_defaults(cls: type[nn.Module]) -> dict[str, Any]:
    """The default of every keyword of ``cls``'s constructor (``RNNBase``'s for LSTM, GRU, RNN)."""
    function = nn.RNNBase.__init__ if issubclass(cls, nn.RNNBase) else cls.__init__
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return {}
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    if issubclass(cls, nn.RNN):
        defaults["nonlinearity"] = "tanh"
    return defaults


#: torch modules whose constructor arguments are not attributes of the same names: how to read
#: them back. The call written from them is still checked (built on the meta device, compared).
_CONSTRUCTOR_ARGUMENTS: dict[type[nn.Module], Any] = {
    nn.LSTM: _recurrent_arguments,
    nn.GRU: _recurrent_arguments,
    nn.RNN: _recurrent_arguments,
    nn.MultiheadAttention: _attention_arguments,
    nn.TransformerEncoderLayer: _transformer_layer_arguments,
    nn.TransformerDecoderLayer: _transformer_layer_arguments,
}


class SourceWriter:
    """Builds the generated file for one rewritten model."""

    def __init__(
        self,
        model: nn.Module,
        graph_module: fx.GraphModule | None,
        user_module: ModuleType | None,
        user_source: Path | None,
    ) -> None:
        self.model = model
        self.graph_module = graph_module
        self.user_module = user_module
        self.user_source = user_source
        self.used_layers: list[type[nn.Module]] = []
        self.user_classes: dict[str, Any] = {}
        self.emitted: dict[int, str] = {}
        self.lines: list[str] = []
        self.namespace: dict[str, Any] = {"nn": nn, "torch": torch}
        self.imports: set[str] = set()
        self.original_aliases: list[str] = []
        stem = user_source.stem if user_source is not None else "model"
        self.original_copy_name = f"original_{re.sub(r'[^A-Za-z0-9_]', '_', stem)}.py"
        self.forward_targets: set[str] = set()
        #: Names the traced code calls through ``torch.fx.wrap`` (wrapped again at module level).
        self.wrapped_functions: list[str] = []
        if graph_module is not None:
            self.forward_targets = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_module"}

    # ---------------------------------------------------------------- constructor calls

    def _class_reference(self, cls: type[nn.Module]) -> str | None:
        info = block_info(cls)
        if info is not None:
            if info.copy_source:
                if cls not in self.used_layers:
                    self.used_layers.append(cls)
            else:
                self.imports.add(f"from {cls.__module__} import {cls.__name__}")
            self.namespace[cls.__name__] = cls
            return cls.__name__
        if cls.__module__.startswith("torch.nn") and getattr(nn, cls.__name__, None) is cls:
            return f"nn.{cls.__name__}"
        return None

    def constructor(self, module: nn.Module) -> str | None:
        """``nn.Conv2d(...)``-style call that rebuilds ``module``'s own part, or None."""
        cls = type(module)
        reference = self._class_reference(cls)
        if reference is None:
            return None
        if cls in _CONSTRUCTOR_ARGUMENTS:
            return self._keyword_constructor(reference, module, _CONSTRUCTOR_ARGUMENTS[cls](module))
        try:
            signature = inspect.signature(cls.__init__)
        except (TypeError, ValueError):
            return None
        positional: list[str] = []
        keywords: list[str] = []
        for parameter in signature.parameters.values():
            if parameter.name in _SIGNATURE_SKIP or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if not hasattr(module, parameter.name):
                if parameter.default is inspect.Parameter.empty:
                    return None
                continue
            value = getattr(module, parameter.name)
            if parameter.name == "bias" and (isinstance(value, torch.Tensor) or value is None):
                value = value is not None
            if isinstance(value, torch.Tensor) or not _is_literal(value):
                if parameter.default is inspect.Parameter.empty:
                    return None
                continue
            default = parameter.default
            if default is not inspect.Parameter.empty:
                if value == default:
                    continue
                if (
                    isinstance(value, tuple)
                    and value
                    and all(v == default for v in value)
                    and not isinstance(default, tuple)
                ):
                    continue
                keywords.append(f"{parameter.name}={_literal(value)}")
            elif keywords:
                keywords.append(f"{parameter.name}={_literal(value)}")
            else:
                positional.append(_literal(value))
        return self._with_dtype(f"{reference}({', '.join(positional + keywords)})", module)

    def _keyword_constructor(self, reference: str, module: nn.Module, arguments: dict[str, Any]) -> str | None:
        """``reference(name=value, ...)``; a function argument (an activation) is written as an
        imported name. None when a value has neither a literal form nor an importable name."""
        keywords: list[str] = []
        defaults = _constructor_defaults(type(module))
        for name, value in arguments.items():
            if name in defaults and type(defaults[name]) is type(value) and defaults[name] == value:
                continue  # as a person writes it: only what differs from the defaults
            if _is_literal(value):
                keywords.append(f"{name}={_literal(value)}")
                continue
            named = self._reference(value)
            if named is None:
                return None
            keywords.append(f"{name}={named}")
        return self._with_dtype(f"{reference}({', '.join(keywords)})", module)

    def _with_dtype(self, expression: str, module: nn.Module) -> str:
        dtypes = {
            t.dtype
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if t.is_floating_point()
        }
        if len(dtypes) == 1 and (dtype := next(iter(dtypes))) != torch.get_default_dtype():
            expression += f".to({dtype})"
        return expression

    def _fresh(self, expression: str) -> nn.Module | None:
        try:
            with torch.device("meta"):
                built = eval(expression, dict(self.namespace))  # noqa: S307 - our own generated text
        except Exception:
            return None
        return built if isinstance(built, nn.Module) else None

    # ---------------------------------------------------------------- tree

    def needs_class(self, name: str, module: nn.Module) -> bool:
        """Whether ``module``'s own forward code must exist in the generated model.

        It runs when the graph calls it, and when it sits inside a module the graph calls as one
        node (an untraceable leaf runs its children's forwards); without a graph every forward runs.
        """
        if self.graph_module is None:
            return True
        parts = name.split(".")
        return any(".".join(parts[:end]) in self.forward_targets for end in range(1, len(parts) + 1))

    def emit(self, target: str, name: str, module: nn.Module) -> None:
        if id(module) in self.emitted:
            self.lines.append(_assignment(target, self.emitted[id(module)]))
            return
        self.emitted[id(module)] = target
        expression = self.constructor(module)
        if expression is not None:
            fresh = self._fresh(expression)
            if fresh is not None and _module_signature(fresh) == _module_signature(module):
                self.lines.append(_assignment(target, expression))
                self._emit_children_diff(target, name, module, fresh)
                return
        if type(module) in _CONTAINERS:
            inline = self._inline(module, root=True)
            if inline is not None:
                # Nested containers as nested constructor calls, the way a person writes them.
                self.lines.extend(_assignment(target, "\n".join(inline)).split("\n"))
                self._register_tree(target, module)
                return
            self.lines.append(_assignment(target, f"nn.{type(module).__name__}()"))
            self._emit_own_tensors(target, module)
            for child_name, child in module._modules.items():
                self._emit_child(target, name, child_name, child)
            return
        if self.needs_class(name, module) or name in self.forward_targets:
            class_name = self._user_class(module, name)
            self.lines.append(_assignment(target, f"_rebuild({class_name}, {self._plain_attributes(module, name)!s})"))
        else:
            self.lines.append(_assignment(target, "nn.Module()"))
        self._emit_own_tensors(target, module)
        for child_name, grandchild in module._modules.items():
            self._emit_child(target, name, child_name, grandchild)

    def _inline(self, module: nn.Module, seen: set[int] | None = None, root: bool = False) -> list[str] | None:
        """``module`` as one constructor expression (lines, nested calls indented), or None when
        it cannot be one: a shared module, own tensors on a container, a child a constructor does
        not rebuild exactly."""
        seen = set() if seen is None else seen
        if (id(module) in self.emitted and not root) or id(module) in seen:
            return None
        seen.add(id(module))
        if type(module) not in _CONTAINERS:
            expression = self.constructor(module)
            fresh = self._fresh(expression) if expression is not None else None
            if expression is None or fresh is None or _module_signature(fresh) != _module_signature(module):
                return None
            for key, child in module._modules.items():
                built = fresh._modules.get(key)
                if child is None or built is None or not _same_tree(built, child):
                    return None
            return [expression]
        if module._parameters or module._buffers:
            return None
        items: list[tuple[str, list[str]]] = []
        for key, child in module._modules.items():
            if child is None:
                return None
            lines = self._inline(child, seen)
            if lines is None:
                return None
            items.append((key, lines))
        kind = type(module).__name__
        if not items:
            return [f"nn.{kind}()"]
        if kind == "Sequential" and [key for key, _ in items] != [str(i) for i in range(len(items))]:
            self.imports.add("from collections import OrderedDict")
            opening, closing = "nn.Sequential(OrderedDict([", "]))"
            entries = [[f'("{key}", {lines[0]}', *lines[1:]] for key, lines in items]
            entries = [[*entry[:-1], entry[-1] + ")"] for entry in entries]
        elif kind == "ModuleDict":
            opening, closing = "nn.ModuleDict({", "})"
            entries = [[f'"{key}": {lines[0]}', *lines[1:]] for key, lines in items]
        else:
            opening, closing = (f"nn.{kind}([", "])") if kind == "ModuleList" else ("nn.Sequential(", ")")
            entries = [lines for _, lines in items]
        body = [f"    {line}" for entry in entries for line in [*entry[:-1], entry[-1] + ","]]
        return [opening, *body, closing]

    def _emit_child(self, parent_target: str, parent_name: str, child_name: str, child: nn.Module | None) -> None:
        qualified = f"{parent_name}.{child_name}" if parent_name else child_name
        if child is None:
            self.lines.append(f'{parent_target}.register_module("{child_name}", None)')
            return
        self.emit(_attribute_target(parent_target, child_name), qualified, child)

    def _emit_children_diff(self, target: str, name: str, module: nn.Module, fresh: nn.Module) -> None:
        """Children that differ from what the constructor builds (a later rule replaced them)."""
        for child_name, child in module._modules.items():
            fresh_child = fresh._modules.get(child_name)
            if (
                child is not None
                and fresh_child is not None
                and _same_tree(fresh_child, child)
                and id(child) not in self.emitted
            ):
                self._register_tree(_attribute_target(target, child_name), child)
                continue
            self._emit_child(target, name, child_name, child)

    def _register_tree(self, target: str, module: nn.Module) -> None:
        self.emitted.setdefault(id(module), target)
        for child_name, child in module._modules.items():
            if child is not None:
                self._register_tree(_attribute_target(target, child_name), child)

    def _emit_own_tensors(self, target: str, module: nn.Module) -> None:
        for pname, parameter in module._parameters.items():
            if parameter is None:
                self.lines.append(f'{target}.register_parameter("{pname}", None)')
                continue
            shape = tuple(parameter.shape)
            grad = "" if parameter.requires_grad else ", requires_grad=False"
            empty = f"torch.empty({shape}, dtype={parameter.dtype})"
            self.lines.append(f'{target}.register_parameter("{pname}", nn.Parameter({empty}{grad}))')
        for bname, buffer in module._buffers.items():
            if buffer is None:
                self.lines.append(f'{target}.register_buffer("{bname}", None)')
                continue
            self.lines.append(
                f'{target}.register_buffer("{bname}", torch.empty({tuple(buffer.shape)}, dtype={buffer.dtype}))'
            )

    def _plain_attributes(self, module: nn.Module, name: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        for key, value in vars(module).items():
            if key in _MODULE_INTERNALS:
                continue
            reference = self._reference(value) if not _is_literal(value) else None
            if reference is not None:
                # A function or class held as configuration (nn.TransformerEncoderLayer keeps its
                # activation, F.relu): written as a name that is imported.
                attributes[key] = reference
                continue
            if not _is_literal(value) and key.startswith("_"):
                # A private cache (a tensor, a weak reference): the class rebuilds it on demand,
                # or the reload check says that it did not.
                continue
            if not _is_literal(value):
                raise ModelError(
                    f"cannot write source for {name or 'the model'} ({type(module).__name__}): attribute "
                    f"{key!r} holds a {type(value).__name__}, which has no literal form"
                )
            attributes[key] = value
        return attributes

    def _reference(self, value: Any) -> _Reference | None:
        """An importable name for a module-level function or class, or None."""
        if not (inspect.isfunction(value) or inspect.isbuiltin(value) or inspect.isclass(value)):
            return None
        module_name = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", None)
        if not module_name or not qualname or "<" in qualname or "." in qualname:
            return None
        if self.user_module is not None and module_name == self.user_module.__name__:
            self.user_classes[qualname] = value
            return _Reference(f"_original.{qualname}")
        if module_name.startswith("convrewrite_user_") or module_name == "__main__":
            return None
        try:
            found = getattr(importlib.import_module(module_name), qualname)
        except (ImportError, AttributeError):
            return None
        if found is not value:
            return None
        alias = "_ref_" + re.sub(r"\W", "_", f"{module_name}_{qualname}")
        self.imports.add(f"from {module_name} import {qualname} as {alias}")
        self.namespace[alias] = value
        return _Reference(alias)

    def _user_class(self, module: nn.Module, name: str) -> str:
        cls = type(module)
        reference = f"_original.{cls.__qualname__}"
        if self.user_module is not None and cls.__module__ == self.user_module.__name__:
            self.user_classes[cls.__qualname__] = cls
            return reference
        module_name = cls.__module__
        if module_name.startswith("convrewrite_user_") or module_name == "__main__":
            raise ModelError(
                f"cannot write source for {name} ({cls.__name__}): its class comes from an unimportable module"
            )
        alias = "_cls_" + re.sub(r"\W", "_", f"{module_name}_{cls.__qualname__}")
        self.namespace[alias] = cls
        self.imports.add(f"from {module_name} import {cls.__qualname__.split('.')[0]} as {alias}")
        return alias

    # ---------------------------------------------------------------- file

    def forward_source(self) -> str:
        """The traced graph's forward, with its globals turned into imports."""
        assert self.graph_module is not None
        self._import_operator_libraries()
        code = self.graph_module.graph.python_code(root_module="self")
        # FX frees each value as soon as it is dead ("x = None"); drop that noise for readability.
        source = re.sub(r";  (?:[A-Za-z_][A-Za-z0-9_]* = )+None$", "", code.src, flags=re.MULTILINE)
        source = re.sub(r"(\w) : ", r"\1: ", source)
        source = "\n".join(line.rstrip() for line in source.splitlines())
        # A function wrapped with ``torch.fx.wrap`` (torchvision's ``stochastic_depth``) makes the
        # code begin with a ``wrap("name")`` call, which torch allows only at module level.
        wrapped = _WRAP_STATEMENT.findall(source)
        source = _WRAP_STATEMENT.sub("", source)
        self.wrapped_functions += [name for name in wrapped if name not in self.wrapped_functions]
        if wrapped:
            self.imports.add("import torch.fx")
        from torch.fx.graph import _custom_builtins

        for global_name, value in code.globals.items():
            if global_name in _custom_builtins:
                if global_name != "torch" and re.search(rf"\b{re.escape(global_name)}\b", source):
                    self.imports.add(_custom_builtins[global_name].import_str)
                continue
            if getattr(builtins, global_name, None) is value:
                continue
            if isinstance(value, str):
                # A string annotation (the user's file uses ``from __future__ import annotations``):
                # fx names it ``_torch_Tensor_``. model.py has that import too, so the annotation is
                # never evaluated and its text can stand as written.
                source = re.sub(rf"\b{re.escape(global_name)}\b", _annotation_text(value), source)
                continue
            module_name = getattr(value, "__module__", None)
            qualname = getattr(value, "__qualname__", None)
            if self.user_module is not None and module_name == self.user_module.__name__:
                self.original_aliases.append(f"{global_name} = _original.{qualname}")
                self.user_classes[str(qualname)] = value
                continue
            if not module_name or not qualname or "<" in qualname or "." in qualname:
                raise ModelError(f"the traced forward uses {global_name!r}, which cannot be imported by name")
            self.imports.add(f"from {module_name} import {qualname} as {global_name}")
        return textwrap.indent(source.strip("\n"), "    ")

    def _import_operator_libraries(self) -> None:
        """Import what registers the custom torch operators the graph calls (``torch.ops.NS.op``).

        The forward names them through ``torch.ops``, which knows an operator only once the
        library that defines it has been imported: in a fresh process ``model.py`` must import it.
        """
        assert self.graph_module is not None
        namespaces = set()
        operators = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
        for node in self.graph_module.graph.nodes:
            if node.op == "call_function" and isinstance(node.target, operators):
                qualified = getattr(node.target, "_qualified_op_name", None) or node.target.name()
                namespaces.add(qualified.partition("::")[0])
        for namespace in sorted(namespaces - _TORCH_OPERATOR_NAMESPACES):
            library = operator_library(namespace)
            if library is not None and not (self.user_module is not None and library == self.user_module.__name__):
                self.imports.add(f"import {library}  # registers torch.ops.{namespace}")

    def generate(self, class_name: str, header: str, inputs_source: str) -> GeneratedSource:
        self.emitted[id(self.model)] = "self"
        if self.graph_module is not None:
            self._emit_own_tensors("self", self.model)
            for child_name, child in self.model._modules.items():
                self._emit_child("self", "", child_name, child)
            self._emit_graph_constants()
            forward = self.forward_source()
        else:
            root_class = self._user_class(self.model, "")
            self.lines.append(f"self.model = _rebuild({root_class}, {self._plain_attributes(self.model, '')!s})")
            self.emitted[id(self.model)] = "self.model"
            self._emit_own_tensors("self.model", self.model)
            for child_name, child in self.model._modules.items():
                self._emit_child("self.model", "", child_name, child)
            forward = "    def forward(self, *args, **kwargs):\n        return self.model(*args, **kwargs)"
        self._emit_ties()
        needs_original = bool(self.user_classes)
        needs_rebuild = any("_rebuild(" in line for line in self.lines)
        out: list[str] = [header.rstrip("\n"), "", "from __future__ import annotations", ""]
        layer_imports, layer_source = _layer_sources(self.used_layers)
        standard = ["from pathlib import Path", "import torch", "from torch import nn"]
        out += sorted(set(standard) | set(layer_imports) | self.imports, key=_import_order)
        if needs_original:
            out += ["", f'ORIGINAL_SOURCE = "{self.original_copy_name}"', *_ORIGINAL_LOADER, *self.original_aliases]
        if self.wrapped_functions:
            # Called at module level, as torch requires: the function stays one call when
            # model.py is traced again (by convrewrite, or by the user's own fx passes).
            out += ["", *(f'torch.fx.wrap("{name}")' for name in self.wrapped_functions)]
        if needs_rebuild:
            out += _REBUILD_HELPER
        if layer_source:
            out += [
                "",
                "",
                "# " + "-" * 24 + " replacement layers, copied from convrewrite.layers",
                "",
                "",
                layer_source.rstrip("\n"),
            ]
        out += ["", "", f"class {class_name}(nn.Module):", f'    """{_class_doc(self.graph_module is None)}"""']
        out += ["", "    def __init__(self) -> None:", "        super().__init__()"]
        out += [f"        {line}" for line in self.lines]
        out += ["", forward, "", "", inputs_source.rstrip("\n"), "", ""]
        out += _BUILD_AND_LOAD.format(class_name=class_name).splitlines()
        text = "\n".join(out).rstrip("\n") + "\n"
        text = re.sub(r"\n{4,}", "\n\n\n", text)
        return GeneratedSource(
            text=text,
            class_name=class_name,
            user_source=self.user_source if needs_original else None,
            user_source_copy_name=self.original_copy_name if needs_original else None,
            user_classes=sorted(self.user_classes),
        )

    def _emit_graph_constants(self) -> None:
        """Tensors the trace captured as constants (``_tensor_constant0``) become buffers."""
        for name, value in graph_constants(self.model, self.graph_module).items():
            self.lines.append(f'self.register_buffer("{name}", torch.empty({tuple(value.shape)}, dtype={value.dtype}))')

    def _emit_ties(self) -> None:
        """Parameters registered under several names (tied weights) stay one parameter."""
        first: dict[int, str] = {}
        for pname, parameter in self.model.named_parameters(remove_duplicate=False):
            owner, _, attr = pname.rpartition(".")
            if id(parameter) not in first:
                first[id(parameter)] = pname
                continue
            source = first[id(parameter)]
            src_owner, _, src_attr = source.rpartition(".")
            owner_module = self.model.get_submodule(owner) if owner else self.model
            source_module = self.model.get_submodule(src_owner) if src_owner else self.model
            if owner_module is source_module:
                continue
            target_expr = self.emitted.get(id(owner_module))
            source_expr = self.emitted.get(id(source_module))
            if target_expr is None or source_expr is None:
                continue
            line = _assignment(_attribute_target(target_expr, attr), _attribute_target(source_expr, src_attr))
            if line not in self.lines:
                self.lines.append(f"{line}  # tied")


#: Operator namespaces torch defines itself (nothing to import for them).
_TORCH_OPERATOR_NAMESPACES = {"aten", "prims", "quantized", "_quantized", "higher_order", "profiler", "c10d"}


def operator_library(namespace: str) -> str | None:
    """The importable module that defines the torch operator namespace ``namespace``, if known.

    A Python library keeps its ``torch.library.Library(namespace, "DEF")`` at module level; a C++
    extension usually names its namespace after its package (``torchvision::nms``).
    """
    import sys

    for name, module in list(sys.modules.items()):
        if module is None or name.startswith(("torch.", "convrewrite_user_", "convrewrite_original_")):
            continue
        try:
            values = list(vars(module).values())
        except TypeError:
            continue
        for value in values:
            if isinstance(value, torch.library.Library) and value.ns == namespace and value.kind == "DEF":
                return name
    return namespace if namespace in sys.modules else None


class _Reference(str):
    """A name in generated source; its repr is the bare name, so a dict of attributes prints it."""

    def __repr__(self) -> str:
        return str(self)


def _annotation_text(annotation: str) -> str:
    """A string annotation as source: itself when it parses as an expression, else quoted."""
    try:
        ast.parse(annotation, mode="eval")
    except SyntaxError:
        return repr(annotation)
    return annotation


def _same_tree(a: nn.Module, b: nn.Module) -> bool:
    if _module_signature(a) != _module_signature(b):
        return False
    return all(
        (ca is None and cb is None) or (ca is not None and cb is not None and _same_tree(ca, cb))
        for ca, cb in zip(a._modules.values(), b._modules.values())
    )


def _layer_sources(classes: list[type[nn.Module]]) -> tuple[list[str], str]:
    """The imports and bodies of the source files that define the used replacement layers."""
    modules: list[str] = []
    for cls in classes:
        for base in reversed(cls.__mro__):
            name = base.__module__
            if name.split(".")[0] in ("torch", "builtins") or name in modules:
                continue
            if module_is_standalone(name):
                modules.append(name)
    imports: list[str] = []
    chunks = []
    for name in modules:
        module_imports, body = _split_module_source(inspect.getsource(importlib.import_module(name)))
        imports += [i for i in module_imports if i not in imports]
        chunks.append(body)
    return imports, "\n\n".join(chunks).strip("\n") + "\n" if chunks else ""


def _split_module_source(source: str) -> tuple[list[str], str]:
    """(top-level import lines, the rest) of a module, dropping its docstring."""
    tree = ast.parse(source)
    lines = source.splitlines()
    imports: list[str] = []
    skip: set[int] = set()
    for index, statement in enumerate(tree.body):
        is_docstring = (
            index == 0
            and isinstance(statement, ast.Expr)
            and isinstance(getattr(statement, "value", None), ast.Constant)
        )
        if isinstance(statement, (ast.Import, ast.ImportFrom)) or is_docstring:
            end = statement.end_lineno or statement.lineno
            skip.update(range(statement.lineno - 1, end))
            if not is_docstring and not (isinstance(statement, ast.ImportFrom) and statement.module == "__future__"):
                imports.append(ast.unparse(statement))
    body = "\n".join(line for number, line in enumerate(lines) if number not in skip)
    return imports, body.strip("\n") + "\n"


def graph_constants(model: nn.Module, graph_module: fx.GraphModule | None) -> dict[str, torch.Tensor]:
    """The traced constants that are not the model's own parameters or buffers."""
    if graph_module is None:
        return {}
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    known |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    buffers = dict(graph_module.named_buffers())
    return {
        str(n.target): buffers[str(n.target)]
        for n in graph_module.graph.nodes
        if n.op == "get_attr" and n.target not in known and n.target in buffers
    }


def _import_order(line: str) -> tuple[int, int, str]:
    """Standard library first, then torch, the way isort would group them."""
    module = line.split()[1]
    top = module.split(".")[0]
    group = 1 if top == "torch" else 2 if top not in {"pathlib", "collections", "math", "typing", "itertools"} else 0
    return (group, 0 if line.startswith("import ") else 1, line)


def _class_doc(eager: bool) -> str:
    if eager:
        return "The rewritten model: the original class (untraceable forward) with its layers replaced."
    return "The rewritten model; forward is the traced graph of the original, layers replaced in place."


_ORIGINAL_LOADER = [
    "",
    "def _load_original():",
    '    """The copy of the original source file, for classes whose forward could not be traced."""',
    "    import importlib.util",
    "    import sys",
    "",
    "    path = Path(__file__).with_name(ORIGINAL_SOURCE)",
    '    name = "convrewrite_original_" + path.stem',
    "    if name in sys.modules:",
    "        return sys.modules[name]",
    "    spec = importlib.util.spec_from_file_location(name, path)",
    "    module = importlib.util.module_from_spec(spec)",
    "    sys.modules[name] = module",
    "    spec.loader.exec_module(module)",
    "    return module",
    "",
    "",
    "_original = _load_original()",
    "",
]

_REBUILD_HELPER = [
    "",
    "def _rebuild(cls, attributes):",
    '    """An instance of ``cls`` with these plain attributes; its layers are assigned after."""',
    "    module = cls.__new__(cls)",
    "    nn.Module.__init__(module)",
    "    module.__dict__.update(attributes)",
    "    return module",
    "",
]

_BUILD_AND_LOAD = '''def build_model() -> {class_name}:
    """The rewritten architecture with freshly initialized weights."""
    return {class_name}()


def load_model(weights: str | Path | None = None, device: str = "cpu") -> {class_name}:
    """The rewritten model with the transferred weights (needs the safetensors package)."""
    from safetensors.torch import load_model as load_safetensors

    model = build_model()
    path = Path(weights) if weights is not None else Path(__file__).with_name("weights.safetensors")
    load_safetensors(model, str(path), strict=True, device=device)
    return model.to(device)'''


def inputs_source(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``example_inputs()`` rebuilding tensors of the same shapes (seeded, like --input-shape)."""

    def expression(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            shape = tuple(value.shape)
            if value.is_floating_point():
                return f"torch.randn({shape}, generator=generator, dtype={value.dtype})"
            return f"torch.zeros({shape}, dtype={value.dtype})"
        if isinstance(value, tuple):
            return "(" + ", ".join(expression(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        if isinstance(value, list):
            return "[" + ", ".join(expression(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {expression(v)}" for k, v in value.items()) + "}"
        if _is_literal(value):
            return _literal(value)
        raise ModelError(f"cannot write example input of type {type(value).__name__}")

    if kwargs and not args:
        body = expression(dict(kwargs))
    elif len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        body = expression(args[0])
    elif not kwargs:
        body = expression(tuple(args))
    else:
        raise ModelError("cannot write example inputs that mix positional and keyword arguments")
    return (
        "def example_inputs():\n"
        '    """Example input of the shapes the rewrite was verified on (batch first)."""\n'
        "    generator = torch.Generator().manual_seed(0)\n"
        f"    return {body}"
    )


def class_name_for(model: nn.Module) -> str:
    base = re.sub(r"\W", "_", type(model).__name__) or "Model"
    if base == "GraphModule":
        base = "Model"
    return f"{base}Rewritten"
