"""Evaluate one configuration (a set of removed blocks) as a child run, or reuse it from the store."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from pruning.evaluate import SCORER_VERSION, Evaluator
from pruning.tasks import Task
from search import tracking

METRICS = {"multiple_choice": ("acc", "acc_norm"), "perplexity": ("ppl", "word_perplexity", "bits_per_byte"),
           "generation": ("score",)}


def metric_name(metric: str, task: str) -> str:
    """Name of a task's metric in a configuration run, e.g. `acc_piqa`, `ppl_pydoc_ppl`."""
    return f"{metric}_{task}"


def drop(task: Task, baseline: dict[str, float], value: dict[str, float]) -> float:
    """How much worse a configuration is than the baseline on `task`'s primary metric:
    accuracy points lost for multiple choice, score lost for generation (VQA) tasks, increase in
    log-perplexity for perplexity."""
    if task.kind == "multiple_choice":
        return baseline["acc"] - value["acc"]
    if task.kind == "generation":
        return baseline["score"] - value["score"]
    return math.log(value["ppl"]) - math.log(baseline["ppl"])


@dataclass
class StudyContext:
    """Everything that identifies and records evaluations of one model on one set of tasks."""

    client: MlflowClient
    experiment_id: str
    parent_id: str
    evaluator: Evaluator
    identity: dict  # model, revision, dtype, tasks (with data fingerprints), split, n_samples, seed
    counts: dict = field(default_factory=lambda: {"evaluated": 0, "reused": 0})

    @property
    def tasks(self) -> list[Task]:
        return [p.task for p in self.evaluator.prepared]

    def hash_of(self, removed: tuple[int, ...]) -> str:
        return tracking.config_hash({**self.identity, "removed": list(removed), "scorer": SCORER_VERSION})


def task_identity(task: Task) -> dict:
    """A task's name, split, size and a fingerprint of its exact examples."""
    import hashlib

    digest = hashlib.sha256(repr(task.examples).encode()).hexdigest()[:16]
    return {"name": task.name, "split": task.split, "n": len(task.examples), "data": digest}


def study_identity(loaded, tasks: list[Task], split: str, n_samples: int, seed: int) -> dict:
    """What makes two evaluations of a configuration the same: model, revision, dtype and data."""
    return {
        "model": loaded.name,
        "revision": loaded.revision,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "tasks": [task_identity(t) for t in tasks],
        "split": split,
        "n_samples": n_samples,
        "seed": seed,
    }


def removed_tag(removed) -> str:
    """The `removed_blocks` tag: comma-separated, sorted, empty for the baseline."""
    return ",".join(str(b) for b in sorted(removed))


def _metrics_from(run, tasks: list[Task]) -> dict[str, dict[str, float]]:
    values = run.data.metrics
    return {t.name: {m: values[metric_name(m, t.name)] for m in METRICS[t.kind]} for t in tasks}


def lookup(ctx: StudyContext, removed: tuple[int, ...]) -> tuple[dict[str, dict[str, float]], str] | None:
    """(metrics by task, run id) of the first FINISHED run with the hash of `removed`, or None."""
    finished = tracking.find_runs(ctx.client, ctx.hash_of(removed), "FINISHED")
    return (_metrics_from(finished[0], ctx.tasks), finished[0].info.run_id) if finished else None


def evaluate_config(ctx: StudyContext, removed: tuple[int, ...], progress=None) -> tuple[dict[str, dict[str, float]], str, bool]:
    """Metrics per task for `removed`, from a FINISHED run with the same hash or a new child run.

    Returns (metrics by task, run id, reused).
    """
    conf_hash = ctx.hash_of(removed)
    tracking.close_dead_runs(ctx.client, conf_hash)
    found = lookup(ctx, removed)
    if found:
        ctx.counts["reused"] += 1
        return *found, True
    name = f"remove[{removed_tag(removed)}]" if removed else "baseline"
    tags = {tracking.KIND: "config", "removed_blocks": removed_tag(removed), "num_removed": str(len(removed))}
    params = {**{k: v for k, v in ctx.identity.items() if k != "tasks"}, "tasks": ",".join(t.name for t in ctx.tasks),
              "removed_blocks": removed_tag(removed), "scorer_version": SCORER_VERSION}
    run_id = tracking.open_child(ctx.client, ctx.experiment_id, ctx.parent_id, conf_hash, name, tags, params)
    try:
        start = time.perf_counter()
        scores = ctx.evaluator.evaluate(removed, progress)
        seconds = time.perf_counter() - start
        metrics = {metric_name(m, s.task): v for s in scores.values() for m, v in s.metrics.items()}
        metrics.update({f"n_{s.task}": s.n for s in scores.values()})
        tracking.log(ctx.client, run_id, metrics={**metrics, "eval_seconds": seconds})
        for s in scores.values():
            tracking.log_json(ctx.client, run_id, f"{s.task}.json", {"task": s.task, "kind": s.kind, **s.per_example}, "per_example")
        ctx.client.set_terminated(run_id, "FINISHED")
    except BaseException as err:
        tracking.fail(ctx.client, run_id, err)
        raise
    ctx.counts["evaluated"] += 1
    return {s.task: dict(s.metrics) for s in scores.values()}, run_id, False
