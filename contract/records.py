"""Typed records of what studies write as JSON artifacts and analyses read back.

Each record turns into the exact JSON the tracking contract documents (`to_json`) and back
(`from_json`); the files are `sensitivity.json`, `beam_step{k}.json` and
`beam_search_results.json` (contract.names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

Metrics = dict[str, dict[str, float]]  # task -> metric -> value


class RecordError(ValueError):
    """A JSON artifact that is not the record it should be (a key missing)."""


class Record:
    """JSON in and out: fields named in `OPTIONAL` are left out of the JSON while None."""

    OPTIONAL: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """The JSON object of this record (nested records included)."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {k: v for k, v in data.items() if not (k in self.OPTIONAL and v is None)}

    @classmethod
    def from_json(cls, data: dict):
        """The record of a JSON object; keys it does not know (a newer writer's) are ignored, a
        missing key without a default is a RecordError naming it."""
        fields = dataclasses.fields(cls)
        missing = [
            f.name
            for f in fields
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise RecordError(f"not a {cls.__name__} record: missing {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})


def _plain(value):
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class SensitivityReport(Record):
    """`sensitivity.json`: the baseline, each single-block removal's metrics and importance per task
    (lists indexed by block), their mean over tasks, the child run ids (`baseline`, `0`, `1`, ...)
    and how many configurations were evaluated and reused."""

    baseline: Metrics
    num_blocks: int
    importance: dict[str, list[float]]
    metrics: dict[str, list[dict[str, float]]]
    importance_mean: list[float]
    child_runs: dict[str, str]
    counts: dict[str, int]


@dataclass
class Candidate(Record):
    """One configuration a beam search step scored. FINISHED: `drops` per task and their mean.
    STOPPED (racing): `drops` None, `partial_drops` on the `n_examples` per task it saw, and the reason
    in `stopped`. FAILED: the reason in `error`. `step` is set in the results' list of failures."""

    OPTIONAL = ("partial_drops", "n_examples", "stopped", "step")

    removed_blocks: list[int]
    config_hash: str
    run_id: str | None
    status: str  # FINISHED, FAILED or STOPPED
    metrics: Metrics | None
    drops: dict[str, float] | None = None
    mean_drop: float | None = None
    error: str | None = None
    partial_drops: dict[str, float] | None = None
    n_examples: dict[str, int] | None = None
    stopped: str | None = None
    step: int | None = None

    @property
    def ranked(self) -> bool:
        """Whether the candidate has full-data drops (it can enter a beam)."""
        return self.drops is not None


@dataclass
class Recommendation(Record):
    """The best configuration of a beam for `num_removed` blocks: its drops, their mean and spread
    over the tasks, the increment over the step before, and the blocks that stay."""

    num_removed: int
    removed_blocks: list[int]
    mean_drop: float
    std_drop: float
    n_datasets: int
    incremental_drop: float
    num_active_blocks: int
    active_blocks: list[int]
    drops: dict[str, float]
    config_hash: str
    run_id: str | None
    complete: bool  # no candidate of this beam failed up to this step


@dataclass
class BeamStep(Record):
    """`beam_step{k}.json`: every candidate, each criterion's kept beam with its scores, the failures
    and the block lists racing stopped."""

    step: int
    candidates: list[Candidate]
    beams: dict[str, list[dict]]  # criterion -> [{"removed_blocks": [...], "score": float}]
    failed: list[Candidate]
    stopped: list[list[int]]

    @classmethod
    def from_json(cls, data: dict) -> BeamStep:
        step = super().from_json(data)
        step.candidates = [Candidate.from_json(c) for c in step.candidates]
        step.failed = [Candidate.from_json(c) for c in step.failed]
        return step


@dataclass
class BeamResults(Record):
    """`beam_search_results.json`: the recommendations for removing 1..max_removed blocks, each task
    beam's best per step, the baseline, the failures and this worker's counts."""

    model: str
    tasks: list[str]
    num_blocks: int
    settings: dict
    baseline: Metrics
    baseline_run_id: str | None
    recommendations: list[Recommendation]
    num_active_blocks: dict[str, list[int]]  # str(number of kept blocks) -> kept blocks, baseline included
    per_task: dict[str, list[Recommendation]] = field(default_factory=dict)
    failed: list[Candidate] = field(default_factory=list)
    worker: dict = field(default_factory=dict)  # this worker's parent run id and counts

    @classmethod
    def from_json(cls, data: dict) -> BeamResults:
        results = super().from_json(data)
        results.recommendations = [Recommendation.from_json(e) for e in results.recommendations]
        results.per_task = {t: [Recommendation.from_json(e) for e in es] for t, es in results.per_task.items()}
        results.failed = [Candidate.from_json(c) for c in results.failed]
        return results
