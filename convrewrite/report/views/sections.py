"""Lines that the text views (table, markdown) print for the report's optional sections.

A stage that adds a section to the report (``fitting``, ``distillation``, ``evaluation``,
``latency``, ``export``...) gets its summary lines here, registered under the section's key with
``@section_lines("key")``; the table and markdown views print every registered section the report
has, in registration order. Works on the JSON form of the section, so a report read back from
JSON shows the same lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from convrewrite.report.model import Report

_sections: dict[str, Callable[[dict[str, Any]], list[str]]] = {}


def section_lines(key: str) -> Callable[[Callable[[dict[str, Any]], list[str]]], Callable[[dict[str, Any]], list[str]]]:
    def decorate(function: Callable[[dict[str, Any]], list[str]]) -> Callable[[dict[str, Any]], list[str]]:
        _sections[key] = function
        return function

    return decorate


def report_section_lines(report: Report) -> list[str]:
    lines: list[str] = []
    for key, function in _sections.items():
        section = report.sections.get(key)
        if section:
            lines += function(section)
    return lines


def _fidelity_text(fidelity: dict[str, Any] | None) -> str:
    if not fidelity:
        return "--"
    text = f"output error {fidelity['output_relative_error']:.3g}"
    if fidelity.get("agreement") is not None:
        text += f", agreement {fidelity['agreement']:.4f}"
    return text


@section_lines("fitting")
def _fitting(section: dict[str, Any]) -> list[str]:
    layers = section.get("layers", {})
    fidelity = section.get("fidelity", {})
    fitted = layers.get("layers", [])
    reverted = [layer["name"] for layer in fitted if "fit reverted" in (layer.get("note") or "")]
    lines = [
        f"Fitting: {len(fitted)} layer(s) fitted to the original's outputs on {layers.get('fit_samples') or 0:,} "
        f"calibration samples in {layers.get('seconds', 0.0):.1f} s ({layers.get('device', 'cpu')})"
    ]
    transfer, fitted_text = _fidelity_text(fidelity.get("transfer")), _fidelity_text(fidelity.get("fitted"))
    lines.append(f"  held out: transfer {transfer} -> fitted {fitted_text}")
    if reverted:
        lines.append(f"  kept the transfer where the fit did not hold on held-out samples: {', '.join(reverted)}")
    batchnorm = section.get("batchnorm", {})
    if batchnorm.get("modules"):
        kept = (
            "kept" if batchnorm.get("kept") else "not kept (the old statistics gave outputs closer to the original's)"
        )
        lines.append(f"  BatchNorm statistics re-estimated for {batchnorm['modules']} layer(s): {kept}")
    return lines


@section_lines("evaluation")
def _evaluation(section: dict[str, Any]) -> list[str]:
    original, result = section.get("original", {}), section.get("result", {})
    shown = ", ".join(f"{name} {original[name]:.4g} -> {result.get(name, float('nan')):.4g}" for name in original)
    return [f"evaluate() (your metric): {shown}"]


@section_lines("distillation")
def _distillation(section: dict[str, Any]) -> list[str]:
    where = section.get("device", "cpu")
    if section.get("world_size", 1) > 1:
        where += f" x {section['world_size']} processes"
    steps = f"{section.get('completed_steps', 0):,} steps"
    if section.get("best_step") is not None and section.get("best_step") != section.get("completed_steps"):
        steps += f" (kept step {section['best_step']:,})"
    lines = [
        f"Distillation: {steps} of {section.get('loss')} loss in {section.get('total_seconds', 0.0):.1f} s on {where}"
    ]
    initial, best = section.get("initial"), section.get("best")
    if initial and best:

        def text(figures: dict[str, Any]) -> str:
            shown = f"output error {figures['output_relative_error']:.3g}"
            if figures.get("top1_agreement") is not None:
                shown += f", agreement {figures['top1_agreement']:.4f}"
            return shown

        lines.append(f"  held out: before {text(initial)} -> distilled {text(best)}")
    return lines


@section_lines("latency")
def _latency(section: dict[str, Any]) -> list[str]:
    settings, model = section.get("settings", {}), section.get("model", {})
    before, after = model.get("before", {}), model.get("after", {})

    def timing(figures: dict[str, Any]) -> str:
        return f"{figures.get('median_ms', 0.0):.3g} ms (IQR {figures.get('iqr_ms', 0.0):.2g})"

    speedup = section.get("speedup") or 0.0
    slower = f" ({1 / speedup:.2f}x slower)" if 0 < speedup < 1 else ""
    where = f"{settings.get('backend')}, {settings.get('threads')} thread(s), batch {settings.get('batch')}"
    lines = [f"Latency ({where}, interleaved): {timing(before)} -> {timing(after)}, speedup {speedup:.2f}x{slower}"]
    layers = section.get("layers", [])
    if layers:
        shown = ", ".join(f"{layer['name']} {layer['speedup']:.2f}x" for layer in layers if layer.get("speedup"))
        lines.append(f"  per layer, each timed alone: {shown}")
    lines += [f"  note: {note}" for note in section.get("notes", [])]
    return lines


@section_lines("export")
def _export(section: dict[str, Any]) -> list[str]:
    onnx = section.get("onnx")
    if not onnx:
        return []
    return [
        f"Export: {onnx.get('path')} (ONNX opset {onnx.get('opset')}, {onnx.get('exporter')} exporter), "
        f"ONNX Runtime max abs diff {onnx.get('max_abs_diff', 0.0):.3g}"
    ]
