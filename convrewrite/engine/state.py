"""The one typed state that the pipeline's stages read and write.

A run starts with a loaded model, the rules to apply and, optionally, calibration data (a source
of batches split into fit and holdout samples). Each stage adds what it ``ensures`` (profiles,
traces, the rewrite log, fidelity, report sections, metrics); ``pipeline.run_stages`` checks that
what a stage ``requires`` is there before it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from convrewrite.config.stages import RunSettings
from convrewrite.core.loading import LoadedModel
from convrewrite.core.profiling import ModelProfile
from convrewrite.core.tracing import TraceResult
from convrewrite.recovery.batches import BatchSource
from convrewrite.report.log import Fidelity, RewriteLog, RewriteRecord, SkipRecord
from convrewrite.rules.api import Rule


@dataclass
class StageRecord:
    """What one stage did: how long it took and whether it changed the model."""

    name: str
    seconds: float
    modified: bool
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": self.seconds, "modified": self.modified, "summary": self.summary}


@dataclass
class RunState:
    """Everything a report or an ``apply`` needs; ``loaded.model`` is rewritten in place.

    ``settings`` holds the typed settings the stages read (``convrewrite.config.stages``: one
    frozen config per stage, built from the schema). ``sections`` holds their report sections (objects with
    ``to_dict()``), under the key the JSON report uses; ``metrics`` holds named figures that
    ``convrewrite check`` can hold to a budget.
    """

    loaded: LoadedModel
    rules: list[Rule] = field(default_factory=list)
    data: BatchSource | None = None
    settings: RunSettings = field(default_factory=RunSettings)
    trace: TraceResult | None = None
    before: ModelProfile | None = None
    current: ModelProfile | None = None
    after: ModelProfile | None = None
    rewritten_trace: TraceResult | None = None
    log: RewriteLog = field(default_factory=RewriteLog)
    originals: dict[str, nn.Module] = field(default_factory=dict)
    #: Rewritten layers whose replacement also computes modules that now run as ``nn.Identity``
    #: (``fuse-bn``: the conv's replacement computes its BatchNorm too): the original module
    #: whose output the replacement reproduces, or None when that is ambiguous (several were
    #: absorbed). Fitting and layer hints compare against that module, not the layer's own output.
    output_of: dict[str, str | None] = field(default_factory=dict)
    reference: nn.Module | None = None
    fidelity: Fidelity | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def rewrites(self) -> list[RewriteRecord]:
        return self.log.rewrites

    @property
    def skipped(self) -> list[SkipRecord]:
        return self.log.skipped

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per kind of stage (every ``rewrite[rule]`` counts as ``rewrite``)."""
        totals: dict[str, float] = {}
        for record in self.stages:
            key = record.name.partition("[")[0]
            totals[key] = totals.get(key, 0.0) + record.seconds
        return totals


#: The name the rest of the code base used before the pipeline had stages.
EngineResult = RunState
