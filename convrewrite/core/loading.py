"""Find the user's model and its example input.

MODEL takes four forms: ``path/file.py``, ``path/file.py:NAME``, ``package.module:NAME`` and a
directory written by ``convrewrite apply``. Importing a user's file runs their code; the import
leaves ``sys.path`` as it was, forgets the modules of the user's project again (libraries the model
imported stay imported), and keeps the module object so that source generation can still see the
user's classes.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from convrewrite.config.schema import parse_shape
from convrewrite.errors import ModelError, UsageError, first_line

#: Suffixes of weight files, which belong to --weights and never to MODEL.
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")

#: Discovery order when MODEL names no object.
DISCOVERY_ORDER = ("build_model", "model", "the single nn.Module subclass")


@dataclass
class ExampleInputs:
    """Positional and keyword arguments that one forward call receives."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    arg_names: tuple[str, ...] = ()

    def call(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor in the inputs with a readable path (``input``, ``x[0]``, ``batch['image']``)."""
        found: list[tuple[str, torch.Tensor]] = []

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, torch.Tensor):
                found.append((prefix, value))
            elif isinstance(value, (tuple, list)):
                for index, item in enumerate(value):
                    walk(f"{prefix}[{index}]", item)
            elif isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}[{key!r}]", item)

        for index, value in enumerate(self.args):
            walk(self.arg_names[index] if index < len(self.arg_names) else f"arg{index}", value)
        for key, value in self.kwargs.items():
            walk(key, value)
        return found

    def describe(self) -> str:
        parts = [
            f"{name} {'x'.join(str(d) for d in t.shape)} {str(t.dtype).replace('torch.', '')}"
            for name, t in self.tensors()
        ]
        return ", ".join(parts) if parts else "no tensors"


@dataclass
class LoadedModel:
    """A model ready for analysis, with where every piece came from."""

    model: nn.Module
    inputs: ExampleInputs
    spec: str
    display_name: str
    origin: str
    source_file: Path | None = None
    user_module: ModuleType | None = None
    weights: Path | None = None
    from_apply_dir: Path | None = None

    @contextlib.contextmanager
    def module_registered(self) -> Iterator[None]:
        """Make the user's module importable by name for the duration (for ``inspect``)."""
        module = self.user_module
        if module is None or sys.modules.get(module.__name__) is module:
            yield
            return
        previous = sys.modules.get(module.__name__)
        sys.modules[module.__name__] = module
        try:
            yield
        finally:
            if previous is None:
                sys.modules.pop(module.__name__, None)
            else:
                sys.modules[module.__name__] = previous


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,1,32,320"`` (or ``1x1x32x320``) to a shape; batch included."""
    return parse_shape(text)


@contextlib.contextmanager
def isolated_import(extra_path: Path | None) -> Iterator[None]:
    """Import user code, then put ``sys.path`` back and forget the modules of the user's project.

    Only modules loaded from ``extra_path`` (the model's directory, or the directory a dotted MODEL
    is imported from) are removed again, so the next model's ``utils.py`` is not mistaken for this
    one's. Installed libraries the model imported stay imported: many register torch operators at
    import time (``TORCH_LIBRARY``), and torch refuses a second registration in the same process,
    so importing them again (as the generated ``model.py`` and the reload check do) would fail.
    """
    saved_path = list(sys.path)
    saved_modules = dict(sys.modules)
    project = extra_path.resolve() if extra_path is not None else None
    if extra_path is not None:
        sys.path.insert(0, str(extra_path))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in list(sys.modules):
            if name not in saved_modules and _belongs_to_project(name, sys.modules[name], project):
                del sys.modules[name]
        for name, module in saved_modules.items():
            if sys.modules.get(name) is not module:
                sys.modules[name] = module


def _module_files(module: ModuleType | None) -> list[Path]:
    """Where a module was loaded from: its file, or a namespace package's directories."""
    if module is None:
        return []
    file_name = getattr(module, "__file__", None)
    if file_name:
        return [Path(file_name)]
    return [Path(entry) for entry in getattr(module, "__path__", None) or [] if isinstance(entry, str)]


def _belongs_to_project(name: str, module: ModuleType | None, project: Path | None) -> bool:
    """True for a module of the user's project: loaded from ``project`` under its own name.

    A module counts when its file lies in ``project`` itself (the model file, a sibling module) or
    under ``project/<top-level package name>/``. A library installed in a virtual environment
    inside the project (``project/.venv/lib/.../site-packages/timm``) does not: its first path
    component is not its package name. convrewrite itself is never forgotten (the engine keeps
    references to its classes).
    """
    if project is None or name == "convrewrite" or name.startswith("convrewrite."):
        return False
    top = name.partition(".")[0]
    for file in _module_files(module):
        try:
            relative = file.resolve().relative_to(project)
        except (OSError, ValueError):
            continue
        if len(relative.parts) == 1 or relative.parts[0] == top:
            return True
    return False


def _user_frame(exc: BaseException, path: Path) -> str:
    """``file.py:LINE`` of the deepest frame inside the user's file, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if Path(frame.filename).resolve() == path.resolve():
            return f"{path.name}:{frame.lineno}"
    return path.name


def _module_name_for(path: Path) -> str:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"convrewrite_user_{stem}_{digest}"


def import_file(path: Path) -> ModuleType:
    """Execute a user's Python file as a fresh module, reporting failures in one line."""
    name = _module_name_for(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        where = f"{path.name}:{exc.lineno}" if exc.lineno else path.name
        raise ModelError(f"syntax error in {where}: {exc.msg}", hint="fix the model file and run again") from exc
    except ImportError as exc:
        if "relative import" not in str(exc):
            raise ModelError(
                f"importing {path.name} raised {type(exc).__name__} at {_user_frame(exc, path)}: {exc}",
                hint="install what it imports, or run with --debug for the traceback",
            ) from exc
        raise UsageError(
            f"{path.name} uses a relative import ({_user_frame(exc, path)}), so it must be imported as part of "
            "its package, not as a file",
            hint=_dotted_form_hint(path),
        ) from exc
    except Exception as exc:
        raise ModelError(
            f"importing {path.name} raised {type(exc).__name__} at {_user_frame(exc, path)}: {exc}",
            hint="fix the model file, or run with --debug for the traceback",
        ) from exc
    return module


def _dotted_form_hint(path: Path) -> str:
    """How to name ``path`` as ``package.module:NAME`` (its package is every parent with __init__.py)."""
    parts = [path.stem]
    root = path.resolve().parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    name = _likely_model_name(path)
    if len(parts) == 1:
        return (
            f"put {path.name} in a package (a directory with __init__.py) and give MODEL as "
            f"package.{path.stem}:{name} from the directory above the package"
        )
    return f"give MODEL as {'.'.join(parts)}:{name} and run from {root}"


def _likely_model_name(path: Path) -> str:
    """The name MODEL should carry for a file that cannot be imported: build_model, model, or the
    root nn.Module class, read from the source without running it; ``NAME`` when unclear."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return "NAME"
    functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    if "build_model" in functions:
        return "build_model"
    if "model" in assigned:
        return "model"
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")}
    roots = _unused_classes(classes)
    return roots[0] if len(roots) == 1 else "NAME"


def _unused_classes(classes: dict[str, ast.ClassDef]) -> list[str]:
    """The classes that no other class in ``classes`` mentions: the candidates for the root model.

    An inner block (``ResidualBlock``) is built inside the network class that uses it; the network
    itself is used by none of them.
    """
    used: set[str] = set()
    for name, node in classes.items():
        for inner in ast.walk(node):
            if isinstance(inner, ast.Name) and inner.id in classes and inner.id != name:
                used.add(inner.id)
            elif isinstance(inner, ast.Attribute) and inner.attr in classes and inner.attr != name:
                used.add(inner.attr)
    return [name for name in classes if name not in used]


def _class_nodes(module: ModuleType, names: list[str]) -> dict[str, ast.ClassDef]:
    """The class definitions of ``names`` in the module's source file (empty when unreadable)."""
    file_name = getattr(module, "__file__", None)
    if not file_name:
        return {}
    try:
        tree = ast.parse(Path(file_name).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return {}
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name in names}


def import_dotted(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"cannot import module {module_name!r}: {exc}",
            hint="give a path to a .py file, or run from the directory that holds the package",
        ) from exc
    except SyntaxError as exc:
        raise ModelError(f"syntax error in {exc.filename}:{exc.lineno}: {exc.msg}") from exc
    except Exception as exc:
        raise ModelError(
            f"importing {module_name} raised {type(exc).__name__}: {exc}",
            hint="run with --debug for the traceback",
        ) from exc


def _instantiate(obj: Any, label: str) -> tuple[nn.Module, str]:
    if isinstance(obj, nn.Module):
        return obj, f"module instance {label}"
    module_class = inspect.isclass(obj) and issubclass(obj, nn.Module)
    if module_class or callable(obj):
        # One call for both: an nn.Module subclass is built, a factory called, with no arguments.
        try:
            built = obj()
        except TypeError as exc:
            if module_class:
                raise ModelError(
                    f"cannot build {label} with no arguments: {exc}",
                    hint="add a zero-argument build_model() to the file and point at it",
                ) from exc
            raise ModelError(f"calling {label}() failed: {exc}", hint="NAME must take no arguments") from exc
        except Exception as exc:
            doing = "building " if module_class else ""
            raise ModelError(f"{doing}{label}() raised {type(exc).__name__}: {exc}") from exc
        if module_class:
            return built, f"class {label}, built with no arguments"
        if not isinstance(built, nn.Module):
            raise ModelError(f"{label}() returned {type(built).__name__}, not a torch.nn.Module")
        return built, f"factory {label}()"
    raise ModelError(f"{label} is a {type(obj).__name__}; expected an nn.Module instance, subclass or factory")


def module_candidates(module: ModuleType) -> list[str]:
    """Names in ``module`` that could be a model: factories, instances and local subclasses."""
    names = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if (
            isinstance(value, nn.Module)
            or (inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__)
            or inspect.isfunction(value)
            and value.__module__ == module.__name__
            and name == "build_model"
        ):
            names.append(name)
    return names


def discover(module: ModuleType, where: str) -> tuple[nn.Module, str, str]:
    """Pick the model out of an imported module; returns (model, name, origin)."""
    factory = getattr(module, "build_model", None)
    if callable(factory):
        model, origin = _instantiate(factory, "build_model")
        return model, "build_model", origin
    instance = getattr(module, "model", None)
    if isinstance(instance, nn.Module):
        return instance, "model", "module-level instance model"
    classes = [
        name
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and issubclass(value, nn.Module)
        and value.__module__ == module.__name__
        and not name.startswith("_")
    ]
    if len(classes) == 1:
        model, origin = _instantiate(getattr(module, classes[0]), classes[0])
        return model, classes[0], origin
    if not classes:
        raise ModelError(
            f"no model found in {where}: it defines no build_model(), no module-level `model` "
            "and no nn.Module subclass",
            hint=f"name one with {where}:NAME",
        )
    nodes = _class_nodes(module, classes)
    roots = _unused_classes(nodes) if len(nodes) == len(classes) else classes
    if len(roots) == 1:
        hint = f"pick the root module with {where}:{roots[0]} (the other classes are blocks inside it)"
    else:
        hint = f"pick one with {where}:{roots[0]}"
        if len(roots) < len(classes):
            hint += f" (the classes no other class uses: {', '.join(roots)})"
    raise ModelError(
        f"{where} defines {len(classes)} nn.Module subclasses ({', '.join(classes)}) and no "
        "build_model() or `model`, so the model is ambiguous",
        hint=hint,
    )


def _example_inputs_from(module: ModuleType | None, where: str) -> ExampleInputs | None:
    if module is None:
        return None
    factory = getattr(module, "example_inputs", None)
    if callable(factory):
        try:
            value = factory()
        except Exception as exc:
            raise ModelError(f"{where}: example_inputs() raised {type(exc).__name__}: {exc}") from exc
        return _as_inputs(value, f"example_inputs() in {where}")
    shape = getattr(module, "INPUT_SHAPE", None)
    if shape is not None:
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: INPUT_SHAPE must be a tuple of integers, got {shape!r}") from None
        return random_inputs([dims], f"INPUT_SHAPE in {where}")
    return None


def _as_inputs(value: Any, source: str) -> ExampleInputs:
    if isinstance(value, torch.Tensor):
        return ExampleInputs((value,), {}, source)
    if isinstance(value, tuple):
        return ExampleInputs(value, {}, source)
    if isinstance(value, list):
        return ExampleInputs(tuple(value), {}, source)
    if isinstance(value, dict):
        return ExampleInputs((), dict(value), source)
    raise ModelError(f"{source} returned {type(value).__name__}; expected a tensor, or a tuple or dict of tensors")


def random_inputs(shapes: list[tuple[int, ...]], source: str) -> ExampleInputs:
    """Deterministic float32 inputs of the given shapes (seeded, so reports are reproducible)."""
    generator = torch.Generator().manual_seed(0)
    tensors = tuple(torch.randn(shape, generator=generator) for shape in shapes)
    return ExampleInputs(tensors, {}, source)


def split_spec(spec: str) -> tuple[str, str | None]:
    """``file.py:NAME`` to (``file.py``, ``NAME``); leaves Windows drive letters alone."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail and "/" not in tail and "\\" not in tail and len(head) > 1:
        return head, tail
    return spec, None


def resolve_name(module: ModuleType, name: str, where: str) -> tuple[nn.Module, str]:
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            candidates = module_candidates(module)
            listed = ", ".join(candidates) if candidates else "none"
            raise ModelError(f"{where} has no {name!r}", hint=f"candidates: {listed}")
        obj = getattr(obj, part)
    return _instantiate(obj, name)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``.safetensors`` or ``.pt``/``.pth`` (``weights_only=True`` only) into ``model``."""
    if not path.exists():
        raise UsageError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    state: dict[str, torch.Tensor]
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"cannot read {path.name} as safetensors: {exc}") from exc
    elif suffix in {".pt", ".pth", ".bin"}:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            first = first_line(exc)
            raise ModelError(
                f"refusing to load {path.name}: it is not a plain tensor checkpoint "
                f"(torch.load(weights_only=True) failed: {first})",
                hint="convrewrite never unpickles arbitrary objects; save a state_dict or safetensors",
            ) from exc
        state = _state_dict_from(loaded, path)
    else:
        raise UsageError(
            f"unsupported weights format {path.suffix!r} for {path.name}",
            hint="use .safetensors, .pt or .pth",
        )
    expected = model.state_dict()
    # A shared module or tied parameter is saved once; its other names are filled by that one.
    missing = _unshared(model, [k for k in expected if k not in state], state)
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        detail = []
        if mismatched:
            detail.append(f"{len(mismatched)} with other shapes (e.g. {', '.join(mismatched[:2])})")
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ModelError(
            f"weights in {path.name} do not fit the model: {'; '.join(detail)}",
            hint="check that the weights belong to this model",
        )
    # Not strict: the names left out above are aliases of tensors loaded under another name.
    model.load_state_dict(state, strict=False)


def _unshared(model: nn.Module, missing: list[str], state: dict[str, torch.Tensor]) -> list[str]:
    """The missing keys that are really missing: a shared module or tied parameter is saved once
    (safetensors keeps one name per tensor), and loading that one name fills every alias."""
    if not missing:
        return missing
    names_of: dict[int, list[str]] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        names_of.setdefault(id(tensor), []).append(name)
    loaded_aliases = {name for names in names_of.values() if any(n in state for n in names) for name in names}
    return [key for key in missing if key not in loaded_aliases]


def _state_dict_from(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict):
        if all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return loaded
        for key in ("state_dict", "model_state_dict", "model"):
            inner = loaded.get(key)
            if isinstance(inner, dict) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise ModelError(
        f"{path.name} holds a {type(loaded).__name__}, not a state_dict of tensors",
        hint="save model.state_dict() (or a dict with a 'state_dict' entry)",
    )


def forward_argument_names(model: nn.Module) -> tuple[str, ...]:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _check_inputs_fit(model: nn.Module, inputs: ExampleInputs, where: str) -> None:
    """Fail before any work when the example input cannot even be passed to ``forward``."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*inputs.args, **inputs.kwargs)
    except TypeError as exc:
        parameters = list(signature.parameters.values())
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p.name for p in positional if p.default is inspect.Parameter.empty]
        given = len(inputs.args) + len(inputs.kwargs)
        takes = f"{len(required)} input(s) ({', '.join(required)})" if required else "other inputs"
        message = f"{type(model).__name__}.forward takes {takes} but the example input gives {given}: {exc}"
        if inputs.source == "--input-shape":
            order = ", ".join(required) if required else "forward's arguments"
            raise UsageError(message, hint=f"repeat --input-shape once per input, in the order {order}") from None
        raise ModelError(
            message,
            hint=f"make example_inputs() in {where} return a tuple with one tensor per input "
            "(or a dict by name), or pass one --input-shape per input",
        ) from None


def load_model(
    spec: str,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    weights: Path | None = None,
    input_source: str = "--input-shape",
) -> LoadedModel:
    """Resolve MODEL, build it, load weights and find the example input.

    ``input_source`` names where ``input_shapes`` came from, for the report's header.
    """
    target, name = split_spec(spec)
    path = Path(target)
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        raise UsageError(
            f"{target} is a weights file, not a model",
            hint=f"give the model's .py file (or package.module:NAME) as MODEL and pass --weights {target}",
        )
    search_dir = path if path.is_dir() else (path.parent if path.suffix == ".py" else Path.cwd())
    # Everything that runs user code (import, factory, weights, example_inputs) happens inside
    # the isolation, so sibling imports work and nothing leaks into sys.path / sys.modules.
    # Seed torch first: a model built with random init then gives the same report every run.
    torch.manual_seed(0)
    with isolated_import(search_dir.resolve()):
        return _load_model(spec, target, name, path, input_shapes, weights, input_source)


def _load_model(
    spec: str,
    target: str,
    name: str | None,
    path: Path,
    input_shapes: list[tuple[int, ...]] | None,
    weights: Path | None,
    input_source: str = "--input-shape",
) -> LoadedModel:
    module: ModuleType | None
    apply_dir: Path | None = None
    source_file: Path | None = None
    if path.is_dir():
        if name is not None:
            raise UsageError(f"{spec}: a directory takes no :NAME")
        generated = path / "model.py"
        if not generated.is_file():
            raise UsageError(
                f"{path} is a directory without model.py",
                hint="point at a .py file, or at a directory written by `convrewrite apply`",
            )
        apply_dir = path
        source_file = generated
        module = import_file(generated)
        where = str(generated)
        model, display, origin = discover(module, where)
        if weights is None and (path / "weights.safetensors").is_file():
            weights = path / "weights.safetensors"
    elif target.endswith(".py") or path.suffix == ".py" or "/" in target or "\\" in target:
        if not path.exists():
            raise UsageError(f"model file {target} does not exist", hint="check the path")
        if not path.is_file():
            raise UsageError(f"{target} is not a file")
        source_file = path
        module = import_file(path)
        where = path.name
        if name is None:
            model, display, origin = discover(module, where)
        else:
            model, origin = resolve_name(module, name, where)
            display = name
    else:
        if name is None:
            if Path(target + ".py").exists():
                raise UsageError(f"{target} is not a path; did you mean {target}.py?")
            raise UsageError(
                f"cannot interpret MODEL {spec!r}",
                hint="use path/file.py, path/file.py:NAME, package.module:NAME or an apply directory",
            )
        module = import_dotted(target)
        where = target
        model, origin = resolve_name(module, name, where)
        display = name
        file_attr = getattr(module, "__file__", None)
        source_file = Path(file_attr) if file_attr else None

    if weights is not None:
        load_weights(model, Path(weights))

    inputs: ExampleInputs | None
    if input_shapes:
        inputs = random_inputs(list(input_shapes), input_source)
    else:
        inputs = _example_inputs_from(module, where)
    if inputs is None:
        raise UsageError(
            f"no example input for {where}",
            hint="pass --input-shape 1,3,224,224, or define example_inputs() or INPUT_SHAPE in the file",
        )
    model.eval()
    _check_inputs_fit(model, inputs, source_file.name if source_file else target)
    inputs.arg_names = forward_argument_names(model)
    label = f"{source_file.name if source_file else target}:{display}"
    return LoadedModel(
        model=model,
        inputs=inputs,
        spec=spec,
        display_name=label,
        origin=origin,
        source_file=source_file,
        user_module=module,
        weights=Path(weights) if weights is not None else None,
        from_apply_dir=apply_dir,
    )
