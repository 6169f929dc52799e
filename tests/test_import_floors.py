"""The house's floor plan: every import of the package points down, and the stage order is one list.

Each module's imports are read from its source (``ast``, every ``import`` anywhere in the file,
inside functions and ``TYPE_CHECKING`` blocks too), so the check sees the lazy imports that keep
``--help`` fast as well as the top-level ones. A package may import its own modules and any
package on a lower floor; an import of a higher floor fails, unless it is one of the few in
``ALLOWED_UPWARD``, each with the reason it is there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "convrewrite"

#: Bottom to top. A package sees everything below it. (``convrewrite`` itself is the package root:
#: its ``__version__`` is read from every floor.)
FLOORS: tuple[tuple[str, ...], ...] = (
    ("convrewrite", "errors"),
    ("config",),  # settings schema, [tool.convrewrite], one command's resolved Job
    ("report",),  # the report data and its views: no torch, no engine
    ("layers",),  # the replacement blocks
    ("core",),  # loading, tracing, profiling, compare, threads, modules
    ("rules", "rule_api"),  # rule_api: the deprecated pre-restructure alias of rules.api
    ("export",),
    ("speed",),
    ("recovery",),  # fit, distill, calibration data
    ("engine",),  # pipeline, state, stages, report_builder
    ("planning",),  # the planner: candidates, scoring from layer statistics, the knapsack, the Plan
    ("commands",),  # run, apply, distill (and plan): what each command does
    ("gate",),  # check, budgets, their views
    ("api", "testing"),
    ("cli", "__main__"),
)

#: (importing module, imported module) pairs that point up, each justified.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    # The package root's lazy ``convrewrite.rewrite`` / ``convrewrite.report`` facade: the API is
    # reached from ``import convrewrite`` without importing it (or torch) up front.
    ("convrewrite", "convrewrite.api"): "lazy facade of the package root",
    # Which [tool.convrewrite] table describes a model depends on the named targets, and only the
    # gate parses (and validates) them; the import is lazy and torch-free.
    ("convrewrite.config.job", "convrewrite.gate.budgets"): "named targets are parsed by the gate",
    # ``Plan.apply(module, ...)`` is the Python API's one-liner for carrying out a plan: it calls
    # ``convrewrite.rewrite`` lazily, the same entry point a user would; nothing below uses it.
    ("convrewrite.planning.plan", "convrewrite.api"): "Plan.apply is a lazy convenience over the API",
}


def floor_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else parts[0]
    for index, floor in enumerate(FLOORS):
        if key in floor:
            return index
    raise AssertionError(f"{module}: package {key!r} has no floor in FLOORS (add it where it belongs)")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a ``convrewrite`` module in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name == "convrewrite":  # ``from convrewrite import api``: the imported names are modules or not
                found += [(node.lineno, f"convrewrite.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, name))
    return [(line, name) for line, name in found if name == "convrewrite" or name.startswith("convrewrite.")]


def known_module(name: str) -> str:
    """``name`` cut to the deepest prefix that is a module of the package (``from x import f``)."""
    parts = name.split(".")
    while len(parts) > 1:
        candidate = PACKAGE.parent.joinpath(*parts)
        if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    return "convrewrite"


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports in ``source`` (of ``module``) that point up the house and are not allowed."""
    problems = []
    for line, name in imports_of(source, module, is_package):
        imported = known_module(name)
        if floor_of(imported) > floor_of(module) and (module, imported) not in ALLOWED_UPWARD:
            problems.append(f"{module}:{line} imports {imported} (floor {floor_of(imported)} > {floor_of(module)})")
    return problems


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_import_points_down() -> None:
    problems = []
    for path in all_modules():
        problems += upward_imports(path.read_text(), module_name(path), path.name == "__init__.py")
    assert problems == [], "\n".join(problems)


def test_the_allowed_upward_imports_are_still_there() -> None:
    """A stale exception would hide a new upward import of the same pair: each must still occur."""
    seen = set()
    for path in all_modules():
        module = module_name(path)
        for _, name in imports_of(path.read_text(), module, path.name == "__init__.py"):
            seen.add((module, known_module(name)))
    assert set(ALLOWED_UPWARD) <= seen, set(ALLOWED_UPWARD) - seen


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("convrewrite.report.model", "from convrewrite.engine.state import RunState\n"),
        ("convrewrite.core.loading", "def f():\n    import convrewrite.engine.pipeline\n"),
        (
            "convrewrite.config.schema",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from convrewrite.gate.check import plan\n",
        ),
        ("convrewrite.layers.dense", "from convrewrite import api\n"),
        ("convrewrite.recovery.data", "from ..commands import run\n"),
    ],
)
def test_an_upward_import_is_caught(module: str, source: str) -> None:
    assert len(upward_imports(source, module)) == 1


def test_downward_and_sideways_imports_pass() -> None:
    source = "from convrewrite.core.loading import load_model\nfrom convrewrite.engine.state import RunState\n"
    assert upward_imports(source, "convrewrite.engine.pipeline") == []
    assert upward_imports("from convrewrite import __version__\n", "convrewrite.report.model") == []


def test_every_package_has_a_floor() -> None:
    for path in all_modules():
        floor_of(module_name(path))


def test_report_imports_neither_torch_nor_the_engine() -> None:
    """The report is data and views: it renders from JSON anywhere (the engine builds it)."""
    for path in sorted((PACKAGE / "report").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] != "torch", f"{path.name}:{node.lineno} imports {name}"
                assert not name.startswith("convrewrite.engine"), f"{path.name}:{node.lineno} imports {name}"


def test_the_stage_order_is_one_list_naming_every_built_in_stage() -> None:
    from convrewrite.engine.stages import discover_stages
    from convrewrite.engine.stages.base import STAGE_ORDER

    built_in = [cls.name for cls in discover_stages() if cls.__module__.startswith("convrewrite.engine.stages.")]
    assert built_in == [name for name in STAGE_ORDER if name in built_in]
    assert set(built_in) <= set(STAGE_ORDER)
    # No stage file carries an order of its own any more.
    for path in (PACKAGE / "engine" / "stages").glob("*.py"):
        assert not re.search(r"^\s+order\s*=", path.read_text(), re.MULTILINE), path.name


def test_the_pipeline_docstring_lists_the_stages_in_order() -> None:
    from convrewrite.engine import pipeline
    from convrewrite.engine.stages import discover_stages

    names = [cls.name for cls in discover_stages() if cls.__module__.startswith("convrewrite.engine.stages.")]
    doc = pipeline.__doc__ or ""
    positions = [doc.find(f"``{name}") for name in names]
    assert -1 not in positions, [n for n, p in zip(names, positions, strict=True) if p == -1]
    assert positions == sorted(positions)


def test_a_plugin_stage_runs_after_the_stage_it_names() -> None:
    from convrewrite.engine.stages import base, discover_stages

    discover_stages()

    class AfterFit(base.Stage):
        name = "zz-after-fit"
        after = "fit"

    saved = dict(base._registry)
    try:
        base.register_stage(AfterFit)
        names = [cls.name for cls in base.registered_stages()]
        assert names[names.index("fit") + 1] == "zz-after-fit"
    finally:
        base._registry.clear()
        base._registry.update(saved)
