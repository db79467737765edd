"""Typed records of what studies write as JSON artifacts and analyses read back.

Each record turns into the exact JSON the tracking contract documents (`to_json`) and back
(`from_json`); the files are `sensitivity.json`, `beam_step{k}.json` and
`beam_search_results.json` (contract.names).

A configuration is a set of removal units (`Unit`, from pruning.units: a whole block `b4`, the
attention `a4` or the MLP `m4` of a block). Records carry `removed_blocks` (the whole blocks, as
before sublayers) and `removed_units` (every unit's name); read a record's configuration through
its `units` property, never by parsing the names. Records written before sublayers load unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pruning.units import Config, normalize
from pruning.units import Unit as Unit  # the unit type, for analyses

Metrics = dict[str, dict[str, float]]  # task -> metric -> value


def units_of(removed_units: list[str] | None, removed_blocks: list[int]) -> Config:
    """The normalized configuration of a record: its unit names, or (records written before
    sublayers) its whole blocks."""
    return normalize(removed_units if removed_units is not None else removed_blocks)


def unit_names(config: Config) -> list[str]:
    """The `removed_units` list of a configuration (normal order)."""
    return [str(u) for u in normalize(config)]


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
    and how many configurations were evaluated and reused. With removal_unit `sublayer`, also the
    importance of each block's attention and MLP per task (`importance_attn`, `importance_mlp`,
    indexed by block; child runs `a0`, `m0`, ...)."""

    OPTIONAL = ("importance_attn", "importance_mlp")

    baseline: Metrics
    num_blocks: int
    importance: dict[str, list[float]]
    metrics: dict[str, list[dict[str, float]]]
    importance_mean: list[float]
    child_runs: dict[str, str]
    counts: dict[str, int]
    importance_attn: dict[str, list[float]] | None = None
    importance_mlp: dict[str, list[float]] | None = None


@dataclass
class Candidate(Record):
    """One configuration a beam search step scored. FINISHED: `drops` per task and their mean.
    STOPPED (racing): `drops` None, `partial_drops` on the `n_examples` per task it saw, and the reason
    in `stopped`. FAILED: the reason in `error`. `step` is set in the results' list of failures.
    `removed_blocks` are its whole blocks, `removed_units` all its units (`units`: the configuration)."""

    OPTIONAL = ("partial_drops", "n_examples", "stopped", "step", "removed_units")

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
    removed_units: list[str] | None = None

    @property
    def units(self) -> Config:
        """The configuration this candidate removes."""
        return units_of(self.removed_units, self.removed_blocks)

    @property
    def ranked(self) -> bool:
        """Whether the candidate has full-data drops (it can enter a beam)."""
        return self.drops is not None


@dataclass
class Recommendation(Record):
    """The best configuration of a beam for `num_removed` units (blocks, or sublayers): its drops,
    their mean and spread over the tasks, the increment over the step before, the blocks that stay
    (whole or in part), and, for searches over sublayers, the parameters removed."""

    OPTIONAL = ("removed_units", "params_removed")

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
    removed_units: list[str] | None = None
    params_removed: int | None = None

    @property
    def units(self) -> Config:
        """The configuration recommended."""
        return units_of(self.removed_units, self.removed_blocks)


@dataclass
class BeamStep(Record):
    """`beam_step{k}.json`: every candidate, each criterion's kept beam with its scores, the failures
    and the configurations racing stopped (block lists, or unit names with sublayers: pruning.units.identity)."""

    step: int
    candidates: list[Candidate]
    beams: dict[str, list[dict]]  # criterion -> [{"removed_blocks": [...], "removed_units": [...], "score": float}]
    failed: list[Candidate]
    stopped: list[list]

    @property
    def stopped_units(self) -> list[Config]:
        """The configurations racing stopped."""
        return [normalize(c) for c in self.stopped]

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
