"""Turn an engine result (profiles, rewrites, skips, fidelity) into a ``Report`` data object."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from convrewrite.report.model import MIB, LayerRow, Report, SummaryRow, TorchSummary, Totals
from convrewrite.rules.api import config_as_dict

if TYPE_CHECKING:  # the builder reads engine records; importing it must not import torch
    from convrewrite.core.profiling import CallRecord, ModelProfile
    from convrewrite.engine.state import RunState as EngineResult


def totals_of(profile: ModelProfile, metrics: dict[str, float] | None = None) -> Totals:
    return Totals(
        params=profile.params,
        trainable_params=profile.trainable_params,
        macs=profile.macs,
        param_bytes=profile.param_bytes,
        buffer_bytes=profile.buffer_bytes,
        metrics=dict(metrics or {}),
    )


def _per_sample(shape: list[int]) -> int:
    return int(math.prod(shape[1:])) if shape else 1


def torchsummary_of(profile: ModelProfile) -> TorchSummary:
    """torchsummary's rows and figures, computed from our profile.

    torchsummary hooks every module except ``nn.Sequential``, ``nn.ModuleList`` and the model
    itself, in the order their forward calls finish, and assumes 4 bytes per number and a batch
    of one. Unlike torchsummary, shared or tied parameters are counted once.
    """
    rows: list[SummaryRow] = []
    total_output = 0
    ordered = sorted((r for r in profile.records if r.called and r.post_index >= 0), key=lambda r: r.post_index)
    for record in ordered:
        # torchsummary skips isinstance(m, (Sequential, ModuleList)), so blocks that subclass
        # nn.Sequential contribute only their children's rows, as in the CRNN document.
        if record.name == "" or record.is_container:
            continue
        shapes = record.output_shapes
        if len(shapes) == 1:
            shown = str([-1, *shapes[0][1:]])
        else:
            shown = str([[-1, *s[1:]] for s in shapes])
        rows.append(SummaryRow(f"{record.type}-{len(rows) + 1}", shown, record.params))
        total_output += sum(_per_sample(s) for s in shapes)
    input_numbers = sum(_per_sample(s) for s in profile.input_shapes)
    return TorchSummary(
        rows=rows,
        total_params=profile.params,
        trainable_params=profile.trainable_params,
        input_mb=input_numbers * 4.0 / MIB,
        forward_backward_mb=2.0 * total_output * 4.0 / MIB,
        params_mb=profile.params * 4.0 / MIB,
    )


def _shown(profile: ModelProfile, hidden_roots: set[str]) -> list[CallRecord]:
    """The rows of the layer table: leaf calls, modules with their own params/MACs, uncalled."""
    shown = []
    hidden_prefixes = tuple(name + "." for name in hidden_roots)
    for record in profile.records:
        if record.name and record.name.startswith(hidden_prefixes):
            continue
        if record.name in hidden_roots:
            shown.append(record)
            continue
        if not record.called:
            shown.append(record)
            continue
        if record.name == "" and not (record.params or record.macs):
            continue
        if record.is_leaf or record.params or record.macs:
            shown.append(record)
    return shown


def _subtree(profile: ModelProfile, record: CallRecord) -> tuple[int, int]:
    params, macs = record.params, record.macs
    for other in profile.records[record.index + 1 :]:
        if not other.called or other.depth <= record.depth:
            break
        params += other.params
        macs += other.macs
    return params, macs


def _type_label(record: CallRecord) -> str:
    if not record.is_leaf and record.macs_by_kind:
        return f"{record.type} (own {', '.join(sorted(record.macs_by_kind))})"
    return record.type


def _match_shared_calls(result: EngineResult, after_map: dict[tuple[str, int], Any]) -> None:
    """Give each call of a shared replacement the row of the original call it stands for.

    Tied convs (distinct modules sharing their parameters) become one replacement module, which
    the rewritten model's profile names after its first name only: ``left`` call 0 and 1 stand for
    ``left`` and ``right`` call 0. The model runs its layers in the same order before and after,
    so the calls pair up in execution order.
    """
    assert result.after is not None and result.before is not None
    for rewrite in result.rewrites:
        if not rewrite.aliases:
            continue
        names = {rewrite.name, *rewrite.aliases}
        before_calls = sorted((r for r in result.before.records if r.name in names and r.called), key=lambda r: r.index)
        after_calls = sorted((r for r in result.after.records if r.name in names and r.called), key=lambda r: r.index)
        if len(before_calls) != len(after_calls):
            continue
        moved = {}
        for old, new in zip(before_calls, after_calls):
            key = (new.name, new.call_number)
            if key in after_map:
                moved[(old.name, old.call_number)] = after_map.pop(key)
        after_map.update(moved)


def layer_rows(result: EngineResult) -> list[LayerRow]:
    before = result.before
    assert before is not None
    after = result.after
    rewritten = {layer.name for layer in result.fidelity.layers} if result.fidelity else set()
    for rewrite in result.rewrites:
        rewritten.update(a for a in rewrite.aliases if "." not in a or a.rpartition(".")[0] not in rewritten)
    kernel_errors = (
        {layer.name: layer.kernel_relative_error for layer in result.fidelity.layers} if result.fidelity else {}
    )
    for rewrite in result.rewrites:
        for alias in rewrite.aliases:
            if rewrite.name in kernel_errors:
                kernel_errors.setdefault(alias, kernel_errors[rewrite.name])
    rules_of: dict[str, list[str]] = {}
    for rewrite in result.rewrites:
        root = next((r for r in rewritten if rewrite.name == r or rewrite.name.startswith(r + ".")), rewrite.name)
        rules_of.setdefault(root, []).append(rewrite.rule)
    skip_notes: dict[str, list[str]] = {}
    for skip in result.skipped:
        skip_notes.setdefault(skip.name, []).append(f"{skip.rule}: {skip.reason}" if skip.rule != "*" else skip.reason)

    after_map: dict[tuple[str, int], tuple[str, int, int, list[int] | None]] = {}
    if after is not None:
        for record in _shown(after, rewritten):
            if record.name in rewritten and record.called:
                params, macs = _subtree(after, record)
            else:
                params, macs = record.params, record.macs
            shape = record.output_shapes[0] if record.output_shapes else None
            after_map[(record.name, record.call_number)] = (_type_label(record), params, macs, shape)
        _match_shared_calls(result, after_map)
        # A rewritten conv that never ran (on the example input, or no longer after the rewrite,
        # when the model's control flow depends on values) has no call record of its own: sum its
        # children. A second name of a rewritten module is not a layer of its own.
        alias_names = {alias for rewrite in result.rewrites for alias in rewrite.aliases}
        for name in rewritten - alias_names:
            if (name, 0) not in after_map:
                prefix = name + "."
                params = sum(r.params for r in after.records if not r.called and r.name.startswith(prefix))
                block = type(result.model.get_submodule(name)).__name__
                after_map[(name, 0)] = (block, params, 0, None)

    rows: list[LayerRow] = []
    seen: set[tuple[str, int]] = set()
    for record in _shown(before, set()):
        key = (record.name, record.call_number)
        seen.add(key)
        shape = record.output_shapes[0] if record.output_shapes else None
        row = LayerRow(
            name=record.name or "(model)",
            call=record.call_number,
            depth=record.depth,
            type_before=_type_label(record),
            type_after=None,
            output_shape=shape,
            params_before=record.params,
            params_after=None,
            macs_before=record.macs,
            macs_after=None,
        )
        if not record.called:
            row.note = "never called on the example input"
        if after is not None:
            match = after_map.get(key)
            if match is not None:
                row.type_after, row.params_after, row.macs_after, _ = match
            else:
                row.status = "removed"
            if record.name in rewritten:
                row.status = "rewritten"
                row.rules = rules_of.get(record.name, [])
                row.kernel_error = kernel_errors.get(record.name)
            elif record.name in skip_notes:
                row.status = "skipped"
                row.note = "; ".join(dict.fromkeys(skip_notes[record.name]))
        rows.append(row)
    for key, (type_after, params, macs, shape) in after_map.items():
        if key not in seen:
            rows.append(
                LayerRow(
                    key[0] or "(model)",
                    key[1],
                    key[0].count(".") + 1,
                    None,
                    type_after,
                    shape,
                    None,
                    params,
                    None,
                    macs,
                    status="added",
                )
            )
    return rows


def _input_list(result: EngineResult) -> list[dict[str, Any]]:
    return [
        {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        for name, t in result.loaded.inputs.tensors()
    ]


def build_report(result: EngineResult) -> Report:
    loaded = result.loaded
    trace = result.trace
    assert trace is not None and result.before is not None
    model_info = {
        "spec": loaded.spec,
        "name": loaded.display_name,
        "class": type(loaded.model).__name__,
        "origin": loaded.origin,
        "weights": str(loaded.weights) if loaded.weights else None,
        "inputs": _input_list(result),
        "input_source": loaded.inputs.source,
    }
    trace_info = {
        "mode": trace.mode,
        "description": trace.describe(),
        "leaves": [asdict(leaf) for leaf in trace.leaves],
        "failure": trace.failure,
        "checked": trace.checked,
        "specialized": {name: repr(value) for name, value in (trace.specialized or {}).items()},
    }
    rules = [{"name": rule.name, "spec": rule.spec(), "options": config_as_dict(rule.config)} for rule in result.rules]
    # Metrics named "before:NAME" were measured on the original model (a user's evaluate(), say).
    before_metrics = {k.partition(":")[2]: v for k, v in result.metrics.items() if k.startswith("before:")}
    after_metrics = {k: v for k, v in result.metrics.items() if not k.startswith("before:")}
    report = Report(
        model=model_info,
        trace=trace_info,
        rules=rules,
        before=totals_of(result.before, before_metrics),
        after=totals_of(result.after, after_metrics) if result.after is not None else None,
        layers=layer_rows(result),
        rewrites=list(result.rewrites),
        skipped=list(result.skipped),
        fidelity=result.fidelity,
        torchsummary_before=torchsummary_of(result.before),
        torchsummary_after=torchsummary_of(result.after) if result.after is not None else None,
        timings=dict(result.timings),
        sections={key: section.to_dict() for key, section in result.sections.items()},
        stages=[stage.to_dict() for stage in result.stages],
    )
    return report
