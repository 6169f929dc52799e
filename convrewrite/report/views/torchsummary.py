"""torchsummary's exact layout, before and (with rules) after."""

from __future__ import annotations

from convrewrite.report.model import Report, TorchSummary
from convrewrite.report.registry import register_view


def render_torchsummary_block(summary: TorchSummary) -> str:
    """Exactly torchsummary's text layout."""
    rule = "-" * 64
    lines = [rule, "{:>20}  {:>25} {:>15}".format("Layer (type)", "Output Shape", "Param #"), "=" * 64]
    for row in summary.rows:
        lines.append("{:>20}  {:>25} {:>15}".format(row.key, row.output_shape, f"{row.params:,}"))
    lines += [
        "=" * 64,
        f"Total params: {summary.total_params:,}",
        f"Trainable params: {summary.trainable_params:,}",
        f"Non-trainable params: {summary.non_trainable_params:,}",
        rule,
        f"Input size (MB): {summary.input_mb:0.2f}",
        f"Forward/backward pass size (MB): {summary.forward_backward_mb:0.2f}",
        f"Params size (MB): {summary.params_mb:0.2f}",
        f"Estimated Total Size (MB): {summary.total_mb:0.2f}",
        rule,
    ]
    return "\n".join(lines) + "\n"


@register_view("report", "torchsummary", "torchsummary's layout")
def render_torchsummary(report: Report, width: int = 120, color: bool = False) -> str:
    parts = []
    if report.torchsummary_before is not None:
        if report.has_rules:
            parts.append(f"Before: {report.model.get('name')}\n")
        parts.append(render_torchsummary_block(report.torchsummary_before))
    if report.torchsummary_after is not None:
        specs = " then ".join(r["spec"] for r in report.rules)
        parts.append(f"\nAfter: {specs}\n")
        parts.append(render_torchsummary_block(report.torchsummary_after))
    return "".join(parts)
