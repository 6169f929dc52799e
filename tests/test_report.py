"""The report: the JSON contract, invariants, and golden files for the human views."""

from __future__ import annotations

import json

import pytest

from convrewrite.api import report as make_report
from convrewrite.report.model import Report
from convrewrite.report.views import render

from .conftest import ASSETS, SAMPLES
from .golden_files import assert_matches_golden
from .oracles import flop_counter_macs, unique_params


@pytest.fixture(scope="module")
def crnn_separable() -> Report:
    return make_report(str(SAMPLES / "crnn.py"), rules=["separable"])


def test_json_contract(crnn_separable: Report) -> None:
    data = json.loads(render(crnn_separable, "json"))
    assert data["schema"] == "convrewrite.report/1"
    for side in ("before", "after"):
        assert {"params", "trainable_params", "macs"} <= set(data[side])
    assert data["before"]["params"] == 5_551_360 and data["after"]["params"] == 781_450
    assert "FLOPs = 2 x MACs" in data["units"]["macs"]
    assert data["before"]["flops"] == 2 * data["before"]["macs"]
    rewrite = data["rewrites"][0]
    assert {"name", "rule", "params_before", "params_after", "macs_before", "macs_after"} <= set(rewrite)
    assert rewrite["name"] == "conv0" and rewrite["rule"] == "separable"
    assert data["skipped"] == []
    fidelity = data["fidelity"]
    assert {"output_relative_error", "output_cosine_similarity", "layers"} <= set(fidelity)
    assert len(fidelity["layers"]) == 7 and all(0 <= layer["kernel_relative_error"] < 1 for layer in fidelity["layers"])
    assert Report.from_dict(data).after.params == 781_450


def test_rows_sum_to_totals_before_and_after(crnn_separable: Report) -> None:
    rows = crnn_separable.layers
    assert sum(r.params_before or 0 for r in rows) == crnn_separable.before.params
    assert sum(r.macs_before or 0 for r in rows) == crnn_separable.before.macs
    assert crnn_separable.after is not None
    assert sum(r.params_after or 0 for r in rows) == crnn_separable.after.params
    assert sum(r.macs_after or 0 for r in rows) == crnn_separable.after.macs


def test_totals_match_the_oracles() -> None:
    from convrewrite.core.loading import load_model
    from convrewrite.engine.pipeline import analyse
    from convrewrite.engine.report_builder import build_report
    from convrewrite.rules.api import make_rule

    loaded = load_model(str(SAMPLES / "tdnn.py"))
    before_macs = flop_counter_macs(loaded.model, loaded.inputs.args)
    before_params = unique_params(loaded.model)
    result = analyse(loaded, [make_rule("separable")])
    report = build_report(result)
    assert (report.before.params, report.before.macs) == (before_params, before_macs)
    assert report.after is not None
    assert report.after.params == unique_params(result.model)
    assert report.after.macs == flop_counter_macs(result.model, loaded.inputs.args)


def test_skips_and_reasons_in_the_report() -> None:
    report = make_report(str(ASSETS / "tiny.py"), rules=["separable"])
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped == {"proj": "1x1 conv: nothing to separate"}
    row = next(r for r in report.layers if r.name == "proj")
    assert row.status == "skipped" and row.note == "separable: 1x1 conv: nothing to separate"


@pytest.mark.parametrize("fmt", ["table", "markdown", "torchsummary"])
def test_golden_views_crnn(crnn_separable: Report, fmt: str) -> None:
    assert_matches_golden(render(crnn_separable, fmt, width=130), f"report_crnn_separable.{fmt}.txt")


def test_golden_model_table_tdnn() -> None:
    report = make_report(str(SAMPLES / "tdnn.py"))
    assert_matches_golden(render(report, "table", width=100), "report_tdnn.table.txt")
