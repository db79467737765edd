"""Procedures: how units are chosen from a criterion's scores (DESIGN.md, "Units, criteria, procedures").

- `one_shot`: score every unit once on the unpruned model and remove the k lowest (ShortGPT's Block
  Influence, Shortened LLaMA's PPL and Taylor+); a windowed criterion (angular distance, Gromov et
  al.) removes the window of k consecutive blocks that scores lowest;
- `greedy`: re-score the remaining units after every removal and remove the lowest, width 1, as
  SLEB does: search.beam's search with beam_width 1;
- `beam`: search.beam's beam search (prunetrack's own), any width;
- `last_n`: the baseline of "Reassessing Layer Pruning" (Lu et al. 2024): the last k blocks before
  the final one.

greedy and beam re-score configurations, so they take a criterion that measures them (`drop`,
`ppl_drop`); the criteria read from the unpruned model (Block Influence, angular distance, Taylor)
go with one_shot. Each procedure gives the configuration it removes for k = 1..K.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import time

import numpy as np
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from contract import names, tracking
from contract.records import BeamResults
from pruning import criteria
from pruning.criteria import CRITERIA, Inputs
from pruning.criteria.states import BlockStates
from pruning.drop import drop
from pruning.families import removed_parameters
from pruning.tasks import Task
from pruning.units import Config, Unit, normalize
from search.beam import Settings as BeamSettings
from search.beam import run_beam_search
from search.beam_records import best_entry, candidate_row, log_results
from search.cli import SearchError
from search.configs import StudyContext, study_identity
from search.work import Worker

logger = logging.getLogger(__name__)

PROCEDURES = ("beam", "greedy", "one_shot", "last_n")
LAST_N = "last_n"


class ProcedureError(SearchError):
    """An unknown procedure, or one that cannot run with the criterion given."""


def check(criterion: str, procedure: str) -> None:
    """Reject an unknown criterion or procedure, and a search over a criterion that does not measure."""
    if procedure not in PROCEDURES:
        raise ProcedureError(f"unknown procedure {procedure!r}; allowed: {', '.join(PROCEDURES)}")
    if procedure == "last_n":
        return
    found = criteria.get(criterion)
    if procedure in ("beam", "greedy") and not found.measures:
        raise ProcedureError(
            f"procedure {procedure} re-scores after each removal, criterion {criterion} scores the unpruned model only; "
            "allowed with it: one_shot, last_n"
        )


def one_shot(criterion: str, inputs: criteria.Inputs, units: Config, k_max: int) -> list[Config]:
    """The configurations of k = 1..k_max units with the lowest scores (ties: the lower unit), ranked
    once; for a windowed criterion, the lowest-scoring window of k blocks for each k."""
    module = importlib.import_module(f"pruning.criteria.{criterion}")
    if getattr(module, "WINDOW", False):
        configs = []
        for k in range(1, k_max + 1):
            scores = criteria.score(criterion, inputs, (), units, n=k)
            start = min((s, u) for u, s in scores.items() if u.is_block)[1].block
            configs.append(normalize(Unit(b) for b in range(start, start + k)))
        return configs
    scores = criteria.score(criterion, inputs, (), units)
    order = sorted(units, key=lambda u: (scores[u], u))
    return [normalize(order[:k]) for k in range(1, k_max + 1)]


def last_n(num_blocks: int, k_max: int) -> list[Config]:
    """The last k blocks before the final one, for k = 1..k_max."""
    if k_max > num_blocks - 1:
        raise ProcedureError(
            f"last_n removes at most {num_blocks - 1} of {num_blocks} blocks (the final one stays); got k {k_max}"
        )
    return [normalize(Unit(b) for b in range(num_blocks - 1 - k, num_blocks - 1)) for k in range(1, k_max + 1)]


def beam_width(procedure: str, width: int) -> int:
    """The beam width a search procedure runs with: 1 for greedy."""
    return 1 if procedure == "greedy" else width


@dataclasses.dataclass(frozen=True)
class Method:
    """A criterion and a procedure; `last_n` has no criterion."""

    criterion: str
    procedure: str

    @property
    def name(self) -> str:
        return LAST_N if self.procedure == LAST_N else f"{self.criterion}:{self.procedure}"


class Selection:
    """Where methods select: a context on the selection data (and one on its perplexity tasks, the
    calibration text), the criteria's inputs, and what each criterion cost. `settings` gives
    batch_size, chunk_budget_gb, seed, beam_width, racing, racing_alpha (search.settings)."""

    def __init__(self, ctx: StudyContext, ppl_ctx: StudyContext | None, settings):
        self.ctx, self.ppl_ctx, self.settings = ctx, ppl_ctx, settings
        self.loaded = ctx.evaluator.loaded
        self.cost: dict[str, dict] = {}  # criterion -> forward-pass equivalents and seconds
        self.inputs = Inputs(self.loaded.num_blocks)

    def worker(self, ctx: StudyContext) -> Worker:
        return Worker(ctx)

    def measure_on(self, ctx: StudyContext, name: str):
        """A `measure` for criteria: mean drop over `ctx`'s tasks of configurations (blocks only)."""
        worker = self.worker(ctx)
        base = worker.run([()])[()].metrics

        def measure(configs: list[Config]) -> dict[Config, float]:
            start, runs = time.perf_counter(), {c: normalize(c) for c in configs}
            before = dict(ctx.counts)
            outcomes = worker.run(list(runs.values()))
            self.spend(name, ctx.counts["evaluated"] - before["evaluated"], time.perf_counter() - start, ctx)
            return {c: _mean_drop(ctx, base, outcomes[r].metrics) for c, r in runs.items()}

        return measure

    def spend(self, name: str, configs: int, seconds: float, ctx: StudyContext) -> None:
        spent = self.cost.setdefault(name, {"forward_passes": 0.0, "seconds": 0.0, "data": data_of(ctx.tasks)})
        spent["forward_passes"] += configs
        spent["seconds"] += seconds

    def prepare(self) -> None:
        """Fill the criteria's inputs: the block states of the baseline pass, measuring on the selection
        data and on the calibration text, Taylor scores from the calibration text."""
        states = BlockStates(self.loaded.num_blocks)
        self.ctx.evaluator.observer = states
        start = time.perf_counter()
        self.worker(self.ctx).run([()])
        extra = 0
        if states.tokens == 0:  # the baseline came from the store: observe one pass of it
            logger.info("block states: one pass of the unpruned model over the selection data (baseline reused)")
            self.ctx.evaluator.evaluate_many([()])
            extra = 1
        self.ctx.evaluator.observer = None
        for name in ("block_influence", "angular_distance"):
            seconds = time.perf_counter() - start if extra else 0.0
            self.cost[name] = {"forward_passes": extra, "seconds": seconds, "data": data_of(self.ctx.tasks)}
        self.inputs.states = states
        self.inputs.measure = self.measure_on(self.ctx, "drop")
        if self.ppl_ctx is None:
            return
        from pruning.criteria import taylor

        self.inputs.measure_ppl = self.measure_on(self.ppl_ctx, "ppl_drop")
        start = time.perf_counter()
        text = "\n\n".join(e.text for t in self.ppl_ctx.tasks for e in t.examples)
        self.inputs.taylor = taylor.unit_scores(self.loaded, text, self.settings.seed)
        windows = f"{taylor.NUM_SAMPLES} windows of {taylor.SEQ_LEN} tokens of {data_of(self.ppl_ctx.tasks)}"
        self.cost["taylor"] = {"forward_passes": 3.0, "seconds": time.perf_counter() - start, "data": windows}

    def per_unit(self, names_: list[str]) -> dict[str, dict[str, list[float]]]:
        """Every criterion's score of every block of the unpruned model, and of every sublayer where
        the criterion reads the model (measured sublayer removals are the sublayer search's)."""
        n, values = self.loaded.num_blocks, {}
        for name in names_:
            kinds = ("b",) if criteria.get(name).measures or not self.inputs.states.sublayers else ("b", "a", "m")
            values[name] = {}
            for kind in kinds:
                units = tuple(Unit(b, kind) for b in range(n))
                scores = criteria.score(name, self.inputs, (), units)
                values[name][names.criterion_metric(name, kind)] = [scores[u] for u in units]
        return values


def data_of(tasks: list[Task]) -> str:
    """The data a criterion or score read, for reports: each task, its size and split."""
    return ", ".join(f"{t.name} ({len(t.examples)} of {t.split})" for t in tasks)


def _mean_drop(ctx: StudyContext, base: dict, metrics: dict | None) -> float:
    if metrics is None:
        return math.inf
    return float(np.mean([drop(t, base[t.name], metrics[t.name]) for t in ctx.tasks]))


def select(selection: Selection, method: Method, max_k: int, protect: tuple[int, ...] = ()) -> list[Config]:
    """The configuration `method` removes for k = 1..max_k (never a block in `protect`), chosen on the
    selection data. A greedy or beam search runs as a beam search run of its own, nested in the parent."""
    s, n = selection.settings, selection.loaded.num_blocks
    if method.procedure == LAST_N:
        return last_n(n, max_k)
    units = tuple(Unit(b) for b in range(n) if b not in protect)
    if method.procedure == "one_shot":
        return one_shot(method.criterion, selection.inputs, units, max_k)
    ctx = selection.ctx if method.criterion == "drop" else selection.ppl_ctx
    settings = BeamSettings(beam_width(method.procedure, s.beam_width), max_k, 1, protect, "mean", s.racing, s.racing_alpha)
    key = tracking.config_hash({**ctx.identity, **settings.key()})
    tags = {MLFLOW_PARENT_RUN_ID: ctx.parent_id, names.KIND: names.BEAM_SEARCH, names.BEAM_KEY: key}
    run_id = ctx.client.create_run(ctx.experiment_id, run_name=f"{method.name} on {ctx.tasks[0].split}", tags=tags).info.run_id
    tracking.log(ctx.client, run_id, params=dataclasses.asdict(settings))
    nested = dataclasses.replace(ctx, parent_id=run_id)
    start, before = time.perf_counter(), ctx.counts["evaluated"]
    results = run_beam_search(nested, selection.worker(nested), settings, key)
    ctx.client.set_terminated(run_id, "FINISHED")
    selection.spend(method.name, ctx.counts["evaluated"] - before, time.perf_counter() - start, ctx)
    return [normalize(e.removed_blocks) for e in results.recommendations]


def run_procedure(ctx: StudyContext, worker: Worker, settings: BeamSettings, key: str, given) -> BeamResults:
    """beam_search with another criterion or procedure than today's beam over the drop: the criterion's
    per-unit scores logged (`criterion/<name>`), the configurations of 1..max_removed blocks chosen by
    the procedure on the study's data, then scored on it like beam search recommendations."""
    loaded, n = ctx.evaluator.loaded, ctx.evaluator.loaded.num_blocks
    ppl_tasks = [t for t in ctx.tasks if t.kind == "perplexity"]
    criterion = settings.criterion if settings.criterion in CRITERIA else "drop"
    if criterion in ("ppl_drop", "taylor") and not ppl_tasks:
        raise SearchError(
            f"criterion {criterion} needs calibration text: add a perplexity task (e.g. wikitext or pydoc_ppl) to tasks"
        )
    ppl_ctx = None
    if ppl_tasks:
        evaluator = ctx.evaluator.with_tasks(ppl_tasks)
        identity = study_identity(loaded, ppl_tasks, given.split, given.n_samples, given.seed, given.sample)
        ppl_ctx = StudyContext(ctx.client, ctx.experiment_id, ctx.parent_id, evaluator, identity)
    selection = Selection(ctx, ppl_ctx, given)
    selection.prepare()
    for metric, series in selection.per_unit([criterion])[criterion].items():
        tracking.log_series(ctx.client, ctx.parent_id, metric, [v if math.isfinite(v) else float("nan") for v in series])
    configs = select(selection, Method(criterion, settings.procedure), settings.steps(n), settings.protect)
    outcomes = worker.run([()] + configs)
    base = outcomes[()]
    entries, failed, previous = [], [], 0.0
    for k, config in enumerate(configs, 1):
        row = candidate_row(ctx, base.metrics, outcomes[config])
        if row.error:
            failed.append(dataclasses.replace(row, step=k))
            continue
        entries.append(best_entry(row, k, n, previous, True, removed_parameters(loaded, normalize(config))))
        previous = row.mean_drop
    results = BeamResults(
        loaded.name,
        [t.name for t in ctx.tasks],
        n,
        dataclasses.asdict(settings),
        base.metrics,
        base.run_id,
        entries,
        {str(n): list(range(n)), **{str(e.num_active_blocks): e.active_blocks for e in entries}},
        {},
        failed,
        {"parent_run_id": ctx.parent_id, "cost": selection.cost, **ctx.counts},
    )
    log_results(ctx, results)
    return results
