"""The JSON report is a contract: every report validates against report/schema/report-1.json, and
the typed records write exactly the keys the schema requires (renaming a field fails here)."""

from __future__ import annotations

import json
from dataclasses import fields
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from convrewrite.report.log import Fidelity, LayerFidelity, RewriteRecord, SkipRecord
from convrewrite.report.model import SECTION_KEYS, LayerRow, Report, Totals

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"


def _schema() -> dict:
    return json.loads(resources.files("convrewrite.report").joinpath("schema/report-1.json").read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(
    ("model", "rules"),
    [
        (ASSETS / "tiny.py", []),
        (ASSETS / "tiny.py", ["separable"]),
        (ROOT / "sample_models" / "tdnn.py", ["log-group", "separable"]),
        (ROOT / "sample_models" / "zoo" / "tied.py", ["separable"]),
        (ROOT / "sample_models" / "zoo" / "untraceable_root.py", ["group-shuffle"]),
    ],
    ids=["no-rules", "separable", "composed", "ties", "eager"],
)
def test_reports_validate(validator, model: Path, rules: list[str], cli) -> None:
    args = ["report", str(model), "--format", "json"]
    for rule in rules:
        args += ["--rule", rule]
    result = cli(*args)
    assert result.code == 0, result.err
    document = json.loads(result.out)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    assert Report.from_dict(document).to_dict()["rewrites"] == document["rewrites"]  # reads back


def test_the_schema_names_every_key_the_code_writes() -> None:
    schema = _schema()
    defs = schema["$defs"]
    assert set(defs["rewrite"]["required"]) == set(RewriteRecord(**_dummy(RewriteRecord)).to_dict())
    assert set(schema["properties"]["skipped"]["items"]["required"]) == set(SkipRecord("a", "b", "c", "d").to_dict())
    assert set(defs["fidelity"]["required"]) == set(Fidelity(0.0, 1.0, 0.0).to_dict())
    layer_keys = defs["fidelity"]["properties"]["layers"]["items"]["required"]
    assert set(layer_keys) == set(LayerFidelity("a", [], None).to_dict())
    assert set(defs["layer"]["required"]) == set(LayerRow(**_dummy(LayerRow)).to_dict())
    assert set(defs["totals"]["required"]) == set(Totals(1, 1, 1, 1, 1).to_dict())
    for key in SECTION_KEYS:
        assert key in schema["properties"], key


def test_a_renamed_field_would_break_validation(validator, cli) -> None:
    result = cli("report", str(ASSETS / "tiny.py"), "--rule", "separable", "--format", "json")
    document = json.loads(result.out)
    assert not list(validator.iter_errors(document))
    document["rewrites"][0]["kernel_err"] = document["rewrites"][0].pop("kernel_error")
    errors = list(validator.iter_errors(document))
    assert errors and any("kernel_error" in error.message for error in errors)


def _dummy(cls) -> dict:
    values = {}
    for f in fields(cls):
        if f.name in ("aliases", "rules"):
            values[f.name] = []
        elif f.name == "notes":
            values[f.name] = {}
        elif f.type in ("str", "str | None") or "str" in str(f.type):
            values[f.name] = "x"
        else:
            values[f.name] = 0
    return values
