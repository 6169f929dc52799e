"""The CRNN document's torchsummary tables, reproduced exactly.

The expected text in ``tests/golden/crnn_document_*.txt`` is copied verbatim from the seed
document (``004_...``): an independent oracle. Real torchsummary, run on the same models, is the
second oracle.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torchsummary import summary

from convrewrite.core.loading import load_model
from convrewrite.engine.pipeline import analyse
from convrewrite.engine.report_builder import build_report
from convrewrite.report.views import render_torchsummary_block
from convrewrite.rules.api import make_rule

GOLDEN = Path(__file__).parent / "golden"
SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _torchsummary_text(model: torch.nn.Module) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        summary(model, input_size=(1, 32, 320), device="cpu")
    return buffer.getvalue()


def test_cli_prints_the_documents_tables(cli) -> None:
    result = cli("report", SAMPLES / "crnn.py", "--rule", "separable", "--format", "torchsummary")
    assert result.code == 0, result.err
    before = (GOLDEN / "crnn_document_before.txt").read_text()
    after = (GOLDEN / "crnn_document_after.txt").read_text()
    assert before in result.out
    assert after in result.out


def test_acceptance_figures() -> None:
    loaded = load_model(str(SAMPLES / "crnn.py"))
    report = build_report(analyse(loaded, [make_rule("separable")]))
    assert report.before.params == 5_551_360
    assert report.after is not None and report.after.params == 781_450
    ts_before, ts_after = report.torchsummary_before, report.torchsummary_after
    assert ts_before is not None and ts_after is not None
    assert f"{ts_before.params_mb:.2f}" == "21.18"
    assert f"{ts_before.forward_backward_mb:.2f}" == "31.68"
    assert f"{ts_before.total_mb:.2f}" == "52.89"
    assert f"{ts_after.params_mb:.2f}" == "2.98"
    assert f"{ts_after.forward_backward_mb:.2f}" == "37.09"
    assert f"{ts_after.total_mb:.2f}" == "40.11"


def test_matches_real_torchsummary_before_and_after() -> None:
    loaded = load_model(str(SAMPLES / "crnn.py"))
    expected_before = _torchsummary_text(loaded.model)
    result = analyse(loaded, [make_rule("separable")])
    report = build_report(result)
    expected_after = _torchsummary_text(result.model)
    assert report.torchsummary_before is not None and report.torchsummary_after is not None
    assert render_torchsummary_block(report.torchsummary_before) == expected_before
    assert render_torchsummary_block(report.torchsummary_after) == expected_after
