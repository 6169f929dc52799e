"""Pieces every text view shares: number formats, the fixed-width table, markdown rows, headers."""

from __future__ import annotations

from convrewrite.report.model import MIB, Report

MACS_NOTE = "MACs are multiply-accumulates (FLOPs = 2 x MACs); shared or tied parameters are counted once."


def number(value: int | None) -> str:
    return "--" if value is None else f"{value:,}"


def ratio(value: float | None) -> str:
    return "--" if value is None else f"{value:.2f}x"


def mib(value: int) -> str:
    return f"{value / MIB:,.2f} MiB"


def shape_text(shape: list[int] | None) -> str:
    return "--" if not shape else "x".join(str(d) for d in shape)


def header_lines(report: Report) -> list[str]:
    inputs = ", ".join(f"{i['name']} {shape_text(i['shape'])} {i['dtype']}" for i in report.model.get("inputs", []))
    lines = [f"Model: {report.model.get('name')} ({report.model.get('origin')})"]
    lines.append(f"Input: {inputs} (from {report.model.get('input_source')})")
    lines.append(f"Weights: {weights_text(report)}")
    lines.append(f"Trace: {report.trace.get('description')}")
    if report.rules:
        lines.append("Rules: " + " then ".join(r["spec"] for r in report.rules))
    return lines


def weights_text(report: Report) -> str:
    weights = report.model.get("weights")
    if weights:
        return str(weights)
    return "none given (random initialisation, unless the model file loads its own)"


def fidelity_lines(report: Report) -> list[str]:
    """The fidelity sentence, and a warning when no weights were given (then it says little)."""
    fidelity = report.fidelity
    if fidelity is None:
        return []
    text = (
        f"Fidelity on {fidelity.measured_on}: output relative error {fidelity.output_relative_error:.3g}, "
        f"cosine similarity {fidelity.output_cosine_similarity:.4f}"
    )
    if fidelity.agreement is not None:
        text += f", top-1 agreement {fidelity.agreement:.4f}"
    lines = [text]
    if not report.model.get("weights"):
        lines.append("Note: no weights were given; on random weights these fidelity figures say little (--weights).")
    return lines


def fixed_width_table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """A plain table in the style of rich's SIMPLE_HEAD box, at its natural width.

    Hundreds of rows render in milliseconds (rich's layout engine took longer than the whole
    analysis of a ResNet-50), nothing is ever wrapped or truncated, and the text is deterministic.
    Headers may span two lines ("Params\\nbefore").
    """
    header_lines = [h.split("\n") for h in headers]
    depth = max(len(h) for h in header_lines)
    header_lines = [[""] * (depth - len(h)) + h for h in header_lines]
    widths = [max([len(line) for line in header_lines[i]] + [len(row[i]) for row in rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (" " + "   ".join(parts)).rstrip()

    out = [""]
    out += [line([h[level] for h in header_lines]) for level in range(depth)]
    out.append(" " + "─" * (sum(widths) + 3 * (len(widths) - 1)))
    out += [line(row) for row in rows]
    return out


def md_row(cells: list[str]) -> str:
    """One markdown table row; a ``|`` inside a cell is escaped."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
