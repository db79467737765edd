"""Evaluate configurations (sets of removed units: blocks, sublayers; pruning.units) together as child runs,
or reuse them from the store."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from contract import names, tracking
from pruning.evaluate import SCORER_VERSION
from pruning.scoring import ConfigEvaluator
from pruning.tasks import Task
from pruning.units import Config, identity, is_blocks_only, label, removed_blocks
from search import progress

logger = logging.getLogger(__name__)


@dataclass
class StudyContext:
    """Everything that identifies and records evaluations of one model on one set of tasks."""

    client: MlflowClient
    experiment_id: str
    parent_id: str
    evaluator: ConfigEvaluator  # pruning.evaluate.Evaluator or pruning.vlm.GenerationEvaluator
    identity: dict  # model, revision, dtype, tasks (with data fingerprints), split, n_samples, seed
    counts: dict = field(default_factory=lambda: dict.fromkeys(("evaluated", "reused", "stopped", "examples_scored"), 0))
    stage: str = "evaluating"  # what the progress of the next evaluations is labelled with

    @property
    def tasks(self) -> list[Task]:
        return self.evaluator.tasks

    def hash_of(self, removed: Config, stopped_in: str | None = None) -> str:
        """The configuration hash of `removed` (a normalized configuration: whole-block ones hash as
        they did before sublayers, pruning.units.identity); with `stopped_in` (a step's race key), the
        hash of the record of racing having stopped it there, never equal to a full result's."""
        config = {**self.identity, "removed": identity(removed), "scorer": SCORER_VERSION}
        return tracking.config_hash({**config, "stopped_in": stopped_in} if stopped_in else config)


def task_identity(task: Task) -> dict:
    """A task's name, split, size and a fingerprint of its exact examples."""
    import hashlib

    digest = hashlib.sha256(repr(task.examples).encode()).hexdigest()[:16]
    return {"name": task.name, "split": task.split, "n": len(task.examples), "data": digest}


def study_identity(loaded, tasks: list[Task], split: str, n_samples: int, seed: int, sample: str = "seeded") -> dict:
    """What makes two evaluations of a configuration the same: model, revision, dtype and data
    (`sample`: how the n_samples examples were taken, seeded or the first ones)."""
    return {
        "model": loaded.name,
        "revision": loaded.revision,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "tasks": [task_identity(t) for t in tasks],
        "split": split,
        "n_samples": n_samples,
        "seed": seed,
        "sample": sample,
    }


def headline_mean(by_task: dict[str, dict[str, float]], tasks: list[Task]) -> float | None:
    """Mean of each multiple-choice task's headline metric (acc_norm for HellaSwag, ARC-Challenge,
    OpenBookQA; acc for the others), as LLM-Pruner's tables average them; None without such tasks."""
    values = [by_task[t.name][t.headline] for t in tasks if t.kind == "multiple_choice"]
    return float(sum(values) / len(values)) if values else None


def convention_tags(tasks: list[Task]) -> dict[str, str]:
    """`headline/<task>` tags: which metric is each task's headline."""
    return {names.headline_tag(t.name): t.headline for t in tasks if t.headline}


def ppl_window(evaluator, tasks: list[Task]) -> dict[str, int]:
    """Param `ppl_window`, the rolling window (tokens) per-token `ppl` was measured with, when a task
    is a perplexity task: lm-eval's max length of the model, unless the evaluator was given another."""
    if not any(t.kind == "perplexity" for t in tasks):
        return {}
    return {"ppl_window": int(evaluator.max_length)}


def removed_tag(removed: Config) -> str:
    """The `removed_blocks` tag: the whole blocks removed, comma-separated, sorted, empty for the baseline."""
    return ",".join(map(str, removed_blocks(removed)))


def config_text(removed: Config) -> str:
    """A configuration for people: `3,5` (whole blocks, as before sublayers) or `a4,b5` (with sublayers)."""
    return removed_tag(removed) if is_blocks_only(removed) else label(removed)


def run_label(removed: Config, num_blocks: int = 0) -> str:
    """A configuration run's name: `remove[3,5]`, `remove[a4,b5]`, or `baseline`; with `num_blocks`,
    block indices are padded to the model's widest (`remove[03,15]`, `remove[a04,b15]`), so that
    sorting by name sorts by block."""
    if not removed:
        return "baseline"
    width = len(str(num_blocks - 1)) if num_blocks else 1
    kind = "" if is_blocks_only(removed) else "{}"
    return f"remove[{','.join(kind.format(u.kind) + str(u.block).zfill(width) for u in removed)}]"


@dataclass
class Outcome:
    """A configuration's result: metrics per task and its run, or the error that ended it. A
    configuration that racing stopped has the metrics of the examples it saw (`seen` per task)
    and `stopped`, the reason; its run has its own hash and is never taken for a full result."""

    removed: Config
    conf_hash: str
    metrics: dict[str, dict[str, float]] | None = None
    run_id: str | None = None
    error: str | None = None
    stopped: str | None = None
    seen: dict[str, int] | None = None
    reused: bool = False  # found in the store, not scored by this call


def _metrics_from(run, tasks: list[Task]) -> dict[str, dict[str, float]]:
    values = run.data.metrics
    return {t.name: {m: values[names.metric(m, t.name)] for m in t.metrics} for t in tasks}


def lookup(ctx: StudyContext, removed: Config, race_key: str | None = None) -> Outcome | None:
    """The first FINISHED run of `removed` in the store, or None: a full result, else (with
    `race_key`) the record of racing having stopped it in that step."""
    for conf_hash in [ctx.hash_of(removed)] + ([ctx.hash_of(removed, race_key)] if race_key else []):
        finished = tracking.find_runs(ctx.client, conf_hash, "FINISHED")
        if finished:
            run = finished[0]
            stopped = run.data.tags.get(names.STOPPED_REASON)
            seen = {t.name: int(run.data.metrics[names.metric("n", t.name)]) for t in ctx.tasks} if stopped else None
            metrics = _metrics_from(run, ctx.tasks)
            return Outcome(removed, conf_hash, metrics, run.info.run_id, stopped=stopped, seen=seen, reused=True)
    return None


def evaluate_configs(
    ctx: StudyContext, configs: list[Config], race=None, race_key: str | None = None, desc: str | None = None
) -> dict[Config, Outcome]:
    """Outcomes of `configs`: each FINISHED run with the same hash (or, with `race_key`, the
    record of its stop in that step) is reused; the rest are scored together, step-wide (with
    `race`: racing), each as a child run. A configuration whose scoring fails comes back with
    its error (its run FAILED); a failure of the whole set fails every run and is raised."""
    desc = desc or ctx.stage
    outcomes, todo = {}, []
    for removed in configs:
        tracking.close_dead_runs(ctx.client, ctx.hash_of(removed))
        found = lookup(ctx, removed, race_key)
        if found:
            ctx.counts["reused"] += 1
            outcomes[removed] = found
        else:
            todo.append(removed)
    if outcomes:
        logger.info(f"{desc}: {len(outcomes)} of {len(configs)} configurations reused from the store")
    if not todo:
        return outcomes
    runs = {removed: _open_run(ctx, removed) for removed in todo}
    work, unit = progress.work_of(ctx.evaluator)
    try:
        start = time.perf_counter()
        with progress.Progress(f"{desc}: {len(todo)} configurations", work * len(todo), unit) as bar:
            results = ctx.evaluator.evaluate_many(todo, bar, race)
        seconds = time.perf_counter() - start
    except BaseException as err:
        for run_id in runs.values():
            tracking.fail(ctx.client, run_id, err)
        raise
    logger.info(f"{desc}: {len(todo)} configurations scored in {progress.duration(seconds)}")
    shares = progress.shares(results, ctx.tasks, ctx.evaluator.loaded.num_blocks)
    for removed, result in results.items():
        outcomes[removed] = _record(ctx, removed, runs[removed], result, race_key, seconds * shares[removed])
    return {removed: outcomes[removed] for removed in configs}


def _open_run(ctx: StudyContext, removed: Config) -> str:
    tags = {
        names.KIND: names.CONFIG,
        names.REMOVED_BLOCKS: removed_tag(removed),
        names.REMOVED_UNITS: label(removed),
        names.NUM_REMOVED: str(len(removed)),
        **convention_tags(ctx.tasks),
    }
    params = {
        **{k: v for k, v in ctx.identity.items() if k != "tasks"},
        "tasks": ",".join(t.name for t in ctx.tasks),
        names.REMOVED_BLOCKS: removed_tag(removed),
        "scorer_version": SCORER_VERSION,
        **ppl_window(ctx.evaluator, ctx.tasks),
    }
    return tracking.open_child(
        ctx.client,
        ctx.experiment_id,
        ctx.parent_id,
        ctx.hash_of(removed),
        run_label(removed, ctx.evaluator.loaded.num_blocks),
        tags,
        params,
    )


def _record(ctx: StudyContext, removed, run_id: str, result, race_key: str | None, seconds: float) -> Outcome:
    """Log one configuration's step-wide result and its share of the step's time (`elapsed_s`) to its run and end it."""
    conf_hash = ctx.hash_of(removed)
    if result.error is not None:
        tracking.fail(ctx.client, run_id, result.error)
        return Outcome(removed, conf_hash, run_id=run_id, error=tracking.error_tag(result.error))
    scores = result.scores
    metrics = {names.metric(m, s.task): v for s in scores.values() for m, v in s.metrics.items()}
    metrics.update({names.metric("n", s.task): s.n for s in scores.values()})
    tags = {}
    if result.stopped:
        conf_hash = ctx.hash_of(removed, race_key)
        tags = {names.CONFIG_HASH: conf_hash, names.STOPPED: "racing", names.STOPPED_REASON: result.stopped}
        ctx.counts["stopped"] += 1
    else:
        ctx.counts["evaluated"] += 1
    ctx.counts["examples_scored"] += result.n_examples
    tracking.log(ctx.client, run_id, metrics={**metrics, "elapsed_s": seconds}, tags=tags)
    tracking.log_per_example(ctx.client, run_id, scores.values())
    ctx.client.set_terminated(run_id, "FINISHED")
    seen = {s.task: s.n for s in scores.values()} if result.stopped else None
    return Outcome(
        removed, conf_hash, {s.task: dict(s.metrics) for s in scores.values()}, run_id, stopped=result.stopped, seen=seen
    )
