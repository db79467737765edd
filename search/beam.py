"""Beam search over removed units, tracked in MLflow, resumable and shared by any number of workers.

The units are whole blocks (removal_unit `block`), the attention and MLP sublayers of every block
(`sublayer`: 2L units), or both together (`both`); see pruning.units. Step 1 evaluates every
single-unit removal (reusing sensitivity runs already in the store); step k extends each kept
configuration by one more unit (a block's second sublayer makes it the whole block), removes
duplicate sets, evaluates them and keeps the `beam_width` best. `max_params_removed_frac` leaves
out candidates that remove more of the blocks' parameters than that, so a search over sublayers
can run to the parameter budget of k whole blocks. A configuration's score is its drop (pruning.drop.drop) averaged over the
tasks (criterion `mean`) or on one task; ties go to the smaller sorted tuple. Criterion `all` runs
one beam per task beside the mean beam: every configuration is evaluated on all tasks at once, so
the beams share evaluations. The recommendations for removing 1..max_removed blocks are the mean
beam's best (or the named task's), with the mean drop +- std over the tasks.

A step's candidates are scored together, step-wide (pruning.evaluate.Evaluator), and with
`racing` a candidate stops as soon as the data seen shows, with stated confidence, that it cannot
enter any beam it competes in (pruning.racing); survivors are scored on all the data, so every
ranked and recommended configuration carries exact full-data numbers.

Every evaluation is a child run found by its configuration hash, so a rerun continues where the
last one stopped; with `storage`, workers split each step's candidates (search.work), wait for
each other, and compute the same beams from the store.
"""

from __future__ import annotations

from contract import cli
from search.settings import BeamSearchSettings
from search.settings import beam_parser as parser

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load torch
    cli.check_args(parser)

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from contract import names, tracking
from contract.records import BeamResults, BeamStep, Candidate, unit_names
from pruning.drop import RACING_ALPHA
from pruning.racing import Beam, Race
from pruning.units import Config, all_units, identity, normalize, parse_blocks, removed_blocks
from search import beam_records, monitoring, summaries
from search.cli import SearchError, run_main
from search.configs import Outcome, StudyContext, run_label
from search.context import open_context, study_params
from search.work import Worker, shared_claims

logger = logging.getLogger(__spec__.name)  # `python -m search.beam` runs it as __main__: log under its own name


@dataclass(frozen=True)
class Settings:
    """The search plan: what it explores and how it ranks, normalized from the settings of beam_search
    (settings_of) or select_methods (search.procedures); it defines the beam key."""

    beam_width: int
    max_removed: int
    min_active_blocks: int
    protect: tuple[int, ...]
    criterion: str  # mean, all, a task name (the drop criterion), or another criterion (pruning.criteria)
    racing: bool = True  # stop candidates that are confidently out of every beam (pruning.racing)
    racing_alpha: float = RACING_ALPHA
    removal_unit: str = "block"  # block, sublayer or both (pruning.units.all_units)
    max_params_removed_frac: float = 0.0  # 0: no parameter budget
    procedure: str = "beam"  # search.procedures; not in the beam key while `beam`, so keys stay as they were

    @property
    def ranks_drop(self) -> bool:
        """Whether this is today's beam search over the task-metric drop (criterion mean, all or a task),
        greedy being its width 1."""
        from pruning.criteria import CRITERIA

        return self.procedure in ("beam", "greedy") and self.criterion not in CRITERIA

    def steps(self, num_blocks: int) -> int:
        """How many units the search removes at most."""
        free = num_blocks - len(self.protect)
        if self.removal_unit != "block":  # a block's two sublayers are two steps
            return min(self.max_removed, 2 * free)
        return min(self.max_removed, num_blocks - self.min_active_blocks, free)

    def key(self) -> dict:
        """What identifies the search (its beam key), the settings added with sublayers only when not
        at their defaults: a block search keeps the key it had before them."""
        key = asdict(self)
        for name, default in (("removal_unit", "block"), ("max_params_removed_frac", 0.0), ("procedure", "beam")):
            if key[name] == default:
                del key[name]
        return key


def settings_of(args: BeamSearchSettings) -> Settings:
    """The search plan of checked beam_search settings: greedy's width 1, `drop` as `mean`, protect parsed."""
    from search.procedures import beam_width

    args.check()
    return Settings(
        beam_width(args.procedure, args.beam_width),
        args.max_removed,
        args.min_active_blocks,
        parse_blocks(args.protect, "protect"),
        args.ranked_criterion,
        args.racing,
        args.racing_alpha,
        args.removal_unit,
        args.max_params_removed_frac,
        args.procedure,
    )


def check_blocks(settings: Settings, num_blocks: int) -> None:
    """Reject protected blocks outside the model and limits that leave nothing to remove."""
    bad = [b for b in settings.protect if not 0 <= b < num_blocks]
    if bad:
        raise SearchError(f"protect block {bad[0]} out of range; allowed: 0..{num_blocks - 1}")
    if settings.steps(num_blocks) < 1:
        raise SearchError(
            f"nothing to remove from {num_blocks} blocks with min_active_blocks="
            f"{settings.min_active_blocks} and protect={','.join(map(str, settings.protect))}; "
            f"allowed: min_active_blocks 1..{num_blocks - 1}, at least one block not protected"
        )


def criteria(criterion: str, tasks: list[str]) -> list[str]:
    """The beams to run; the first one gives the recommendations."""
    return ["mean", *tasks] if criterion == "all" else [criterion]


def extend(beam: list[Config], allowed, fits=lambda config: True) -> list[Config]:
    """Every kept configuration plus one more allowed unit (Units, or block indices), normalized,
    without duplicate sets, sorted; only those that grew and that `fits` accepts."""
    grown = {normalize((*kept, unit)) for kept in beam for unit in allowed}
    return sorted(c for c in grown - set(beam) if fits(c))


def score(row: Candidate, criterion: str) -> float:
    """A candidate's ranking value (lower is better); NaN ranks last."""
    value = row.mean_drop if criterion == "mean" else row.drops[criterion]
    return math.inf if math.isnan(value) else value


def rank_key(row: Candidate, criterion: str) -> tuple[int, float]:
    """Order of a step's candidates for their run names: ranked ones by score, then those racing
    stopped by their drop on the examples seen, then the failed."""
    if row.status == "FINISHED":
        return 0, score(row, criterion)
    if row.status == "STOPPED":
        partial = row.partial_drops
        return 1, float(np.mean(list(partial.values()))) if criterion == "mean" else partial[criterion]
    return 2, 0.0


def select(rows: dict[tuple[int, ...], Candidate], candidates: list[tuple[int, ...]], criterion: str, width: int):
    """The `width` best evaluated candidates by `criterion`, ties broken by the sorted tuple."""
    ok = [c for c in candidates if rows[c].ranked]
    return sorted(ok, key=lambda c: (score(rows[c], criterion), c))[:width]


def race_of(ctx: StudyContext, settings: Settings, candidates: dict[str, list]) -> Race | None:
    """The step's race: one beam per criterion (mean: every task weighs 1/T), or None without racing."""
    if not settings.racing or not ctx.evaluator.races:
        return None
    tasks = [t.name for t in ctx.tasks]
    weights = {c: {t: 1 / len(tasks) for t in tasks} if c == "mean" else {c: 1.0} for c in candidates}
    return Race([Beam(weights[c], set(members)) for c, members in candidates.items()], settings.beam_width, settings.racing_alpha)


def budget_check(loaded, settings: Settings):
    """(parameters a configuration removes, whether a configuration fits the search's limits:
    at least min_active_blocks blocks with something left, and within max_params_removed_frac)."""
    from pruning.families import removed_parameters

    n = loaded.num_blocks
    total = sum(p.numel() for p in loaded.blocks.parameters())
    budget = round(settings.max_params_removed_frac * total) if settings.max_params_removed_frac else None

    def params(config: Config) -> int:
        return removed_parameters(loaded, config)

    def fits(config: Config) -> bool:
        return len(removed_blocks(config)) <= n - settings.min_active_blocks and (budget is None or params(config) <= budget)

    return params, fits


def run_beam_search(ctx: StudyContext, worker: Worker, settings: Settings, key: str = "") -> BeamResults:
    """Run the search, logging each step and the results to the parent run; return the results.
    `key` identifies the search (its racing stops are recorded per step under it)."""
    loaded = ctx.evaluator.loaded
    n = loaded.num_blocks
    tasks = [t.name for t in ctx.tasks]
    base = worker.run([()])[()]
    if base.error:
        raise RuntimeError(f"the baseline (no block removed) could not be evaluated: {base.error}")
    allowed = [u for u in all_units(n, settings.removal_unit) if u.block not in settings.protect]
    params, fits = budget_check(loaded, settings)
    criteria_names = criteria(settings.criterion, tasks)
    beams = {c: [()] for c in criteria_names}
    best = {c: [] for c in criteria_names}  # per step: the best kept entry of each beam
    complete = dict.fromkeys(criteria_names, True)  # no candidate of this beam has failed so far
    failed = []
    for k in range(1, settings.steps(n) + 1):
        candidates = {c: extend(beams[c], allowed, fits) for c in criteria_names}
        union = sorted(set().union(*candidates.values()))
        if not union:
            break
        logger.info(f"beam step {k} of {settings.steps(n)}: {len(union)} candidates")
        ctx.stage, started, before = f"beam step {k} of {settings.steps(n)}", time.monotonic(), dict(ctx.counts)
        outcomes = worker.run(union, race_of(ctx, settings, candidates), f"{key}/step{k}")
        rows = {r: beam_records.candidate_row(ctx, base.metrics, outcomes[r]) for r in union}
        step = BeamStep(
            k,
            [rows[r] for r in union],
            {},
            [rows[r] for r in union if rows[r].error],
            [identity(r) for r in union if rows[r].status == "STOPPED"],
        )
        failed += [dataclasses.replace(row, step=k) for row in step.failed]
        for c in criteria_names:
            complete[c] &= all(rows[r].error is None for r in candidates[c])
            beams[c] = select(rows, candidates[c], c, settings.beam_width)
            step.beams[c] = [
                {names.REMOVED_BLOCKS: list(removed_blocks(r)), names.REMOVED_UNITS: unit_names(r), "score": score(rows[r], c)}
                for r in beams[c]
            ]
            if beams[c]:
                previous = best[c][-1].mean_drop if best[c] else 0.0
                best[c].append(beam_records.best_entry(rows[beams[c][0]], k, n, previous, complete[c], params(beams[c][0])))
        tracking.log_json(ctx.client, ctx.parent_id, names.beam_step(k), step.to_json())
        beam_records.log_step(ctx, criteria_names, best, k)
        first = criteria_names[0]
        ranked = sorted(union, key=lambda r: (rank_key(rows[r], first), r))
        scored = {r: outcomes[r].run_id for r in union if not outcomes[r].reused}
        summaries.rank_names(ctx.client, k, ranked, scored, {r: run_label(r, n) for r in union})
        step_counts = {c: ctx.counts[c] - before.get(c, 0) for c in ctx.counts}
        kept = [score(rows[r], first) for r in beams[first]]
        logger.info(
            summaries.step_line(k, settings.steps(n), beams[first], kept, len(union), step_counts, time.monotonic() - started)
        )
    results = _results(ctx, settings, base, best, criteria_names, failed)
    beam_records.log_results(ctx, results)
    return results


def _results(
    ctx: StudyContext, settings: Settings, base: Outcome, best: dict, criteria_names: list[str], failed: list
) -> BeamResults:
    """The search's results: the main beam's best entry per step, each task beam's, the failures and counts."""
    n = ctx.evaluator.loaded.num_blocks
    tasks = [t.name for t in ctx.tasks]
    main = best[criteria_names[0]]
    return BeamResults(
        ctx.identity["model"],
        tasks,
        n,
        asdict(settings),
        base.metrics,
        base.run_id,
        main,
        {str(n): list(range(n)), **{str(e.num_active_blocks): e.active_blocks for e in main}},
        {c: best[c] for c in criteria_names if c != "mean"},
        failed,
        {"parent_run_id": ctx.parent_id, **ctx.counts},
    )


def main(argv=None) -> None:
    """Run a beam search study: `python -m search.beam ...` or `mlflow run . -e beam_search`."""
    args = parser().parse_args(argv)
    given = cli.settings_from(BeamSearchSettings, args)
    settings = settings_of(given)
    client = tracking.connect(args.tracking_uri or None)
    params = {
        **study_params(given),
        **asdict(settings),
        "protect": given.protect,
        "retries": given.retries,
        "retry_delay": given.retry_delay,
        "claim_size": given.claim_size,
    }
    with shared_claims(given.storage) as claims:
        params["storage"] = claims.shown if claims else ""
        experiment = f"{names.BEAM_SEARCH}/{given.model}"
        with (
            tracking.study_run(client, names.BEAM_SEARCH, experiment, params) as (run_id, exp_id),
            monitoring.system_metrics(client, run_id, given.system_metrics, given.device),
        ):
            ctx = open_context(given, client, run_id, exp_id)
            check_blocks(settings, ctx.evaluator.loaded.num_blocks)
            key = tracking.config_hash({**ctx.identity, **settings.key()})
            tracking.log(client, run_id, tags={names.BEAM_KEY: key})
            worker = Worker(ctx, given.retries, given.retry_delay, claims, given.claim_size)
            if settings.ranks_drop:
                results = run_beam_search(ctx, worker, settings, key)
            else:
                from search.procedures import run_procedure

                results = run_procedure(ctx, worker, settings, key, given)
    print(beam_records.summary(results))
    print(f"parent run: {run_id}\nsee it: {tracking.ui_hint(client.tracking_uri)}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
