"""How close a rewritten model stays to the original on held-out data, and the user's own metric.

``measure_fidelity`` streams one split (the holdout split by default: samples never fitted on)
through both models and sums, over every output tensor, the squared difference, both energies and
the dot product in float64, so the figures are exact over the whole split whatever the batch size
and memory stays at one batch. For a model whose output is one tensor shaped (N, classes), the
top-1 agreement with the reference is counted too (labels are not needed: it says how often the
rewritten model picks the class the original picks).

``run_evaluate`` calls the model file's ``evaluate(model) -> float | dict[str, float]`` (the
user's task metric, on their own labelled data) and normalises the result to ``dict[str, float]``;
a single number is reported under the name ``score``. Any problem is one line naming what was
expected and what was found.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from convrewrite.core.compare import OutputAgreement, output_shapes, same_structure
from convrewrite.errors import ModelError, describe
from convrewrite.recovery.batches import Batch, BatchSource, Split

#: The name a single-number ``evaluate()`` result is reported under.
SINGLE_SCORE = "score"


def _fingerprint(batch: Batch) -> tuple:
    """A cheap identity of a batch's values (size, then each tensor's shape and float64 sum)."""
    leaves, _ = tree_flatten((batch.args, batch.kwargs))
    marks: list[Any] = [batch.size]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            marks.append((tuple(leaf.shape), float(leaf.detach().to(torch.float64).sum())))
        else:
            marks.append(repr(leaf))
    return tuple(marks)


class ReferenceOutputs:
    """The reference model's outputs per batch, kept up to ``budget`` bytes and reused.

    The original model never changes during a run, yet the fit stage compares against it up to
    five times (held-out fidelity of the transfer and of the fit, the output error before and
    after BatchNorm re-estimation): its outputs are computed once per batch instead. A kept
    output is reused only for a batch with the same fingerprint (its size, and each input
    tensor's shape and sum), so a data source that yields different samples on each pass
    (augmentation) is computed again, never compared against the wrong output.
    """

    def __init__(self, reference: nn.Module, budget: int = 256 << 20) -> None:
        self.reference = reference
        self.budget, self.used = budget, 0
        self.kept: dict[tuple, tuple[tuple, Any]] = {}
        self.hits = self.misses = 0

    def __call__(self, key: tuple, batch: Batch) -> Any:
        mark = _fingerprint(batch)
        found = self.kept.get(key)
        if found is not None and found[0] == mark:
            self.hits += 1
            return found[1]
        self.misses += 1
        output = batch.call(self.reference)
        leaves, _ = tree_flatten(output)
        size = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        if found is None and self.used + size <= self.budget:
            self.kept[key] = (mark, output)
            self.used += size
        return output


@dataclass
class HoldoutFidelity:
    """Output fidelity of a candidate against a reference over one split of the calibration data."""

    output_relative_error: float
    cosine_similarity: float
    agreement: float | None
    samples: int
    split: str = "holdout"
    max_abs_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_fidelity(
    reference: nn.Module,
    candidate: nn.Module,
    data: BatchSource,
    split: Split = "holdout",
    device: torch.device | str = "cpu",
    outputs: ReferenceOutputs | None = None,
) -> HoldoutFidelity | None:
    """Relative output error, cosine similarity and (for (N, classes) outputs) top-1 agreement.

    None when the split is empty. Both models run in eval mode on ``device`` and are put back
    where they were, in the mode they were in. ``outputs``: the reference's outputs kept from an
    earlier comparison on the same device (see ``ReferenceOutputs``).
    """
    device = torch.device(device)
    homes = [next(iter([*m.parameters(), *m.buffers()]), torch.empty(0)).device for m in (reference, candidate)]
    modes = [m.training for m in (reference, candidate)]
    sums = OutputAgreement()
    reference.to(device).eval()
    candidate.to(device).eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(data.batches(split)):
                batch = batch.to(device)
                expected = outputs((split, 0, 1, index), batch) if outputs is not None else batch.call(reference)
                got = batch.call(candidate)
                if not same_structure(expected, got):
                    raise ModelError(
                        f"the rewritten model's outputs {output_shapes(got)} differ in shape from the "
                        f"original's {output_shapes(expected)}"
                    )
                sums.add(expected, got, batch.size)
    finally:
        for model, home, mode in zip((reference, candidate), homes, modes):
            model.to(home)
            model.train(mode)
    if sums.samples == 0:
        return None
    return HoldoutFidelity(
        sums.relative_error, sums.cosine_similarity, sums.agreement, sums.samples, split, sums.max_abs
    )


def run_evaluate(evaluate: Callable[[nn.Module], Any], model: nn.Module, which: str) -> dict[str, float]:
    """Call the user's ``evaluate(model)`` and return its metrics as ``dict[str, float]``.

    ``which`` names the model in messages ("the original model", "the rewritten model").
    A float (or int, or one-element tensor) becomes ``{"score": value}``.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = evaluate(model)
    except Exception as exc:
        raise ModelError(
            f"evaluate() raised {describe(exc)} on {which}", hint="fix evaluate() in the model file"
        ) from exc
    finally:
        model.train(was_training)
    if isinstance(value, dict):
        if not value:
            raise ModelError(f"evaluate() on {which}: expected a number or a dict of numbers, found an empty dict")
        return {_metric_name(key, which): _number(item, f"evaluate()[{key!r}]", which) for key, item in value.items()}
    return {SINGLE_SCORE: _number(value, "evaluate()", which)}


def _metric_name(key: Any, which: str) -> str:
    if not isinstance(key, str) or not key:
        raise ModelError(f"evaluate() on {which}: expected metric names as non-empty strings, found {key!r}")
    return key


def _number(value: Any, what: str, which: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ModelError(f"{what} on {which}: expected a number, found {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ModelError(f"{what} on {which}: expected a finite number, found {number}")
    return number


__all__ = ["SINGLE_SCORE", "HoldoutFidelity", "ReferenceOutputs", "measure_fidelity", "run_evaluate"]
