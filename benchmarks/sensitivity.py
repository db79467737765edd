"""Benchmark parts 1 and 4: a sensitivity study step-wide against each configuration alone, and the same
beam search with and without racing."""

from __future__ import annotations

import tempfile

import numpy as np

from benchmarks.common import _numbers, _timed, _warm_up
from contract import names
from pruning.evaluate import Evaluator, look_sizes
from pruning.models import LoadedModel
from pruning.tasks import Task
from pruning.units import all_units


def bench_sensitivity(
    loaded: LoadedModel, tasks: list[Task], batch_size: int, budget_share: float | None = None, removal_unit: str = "block"
) -> dict:
    """A sensitivity study (baseline + every single-unit removal: blocks, or with `removal_unit`
    `sublayer` every attention and MLP sublayer): step-wide, all configurations together, against
    each configuration alone (from scratch), on the same chunks, so the per-example results must
    be identical. `budget_share`: the chunk budget holds that share of the dataset's block states
    (user-scale proportions), else all of them."""
    configs = [()] + [(u,) for u in all_units(loaded.num_blocks, removal_unit)]
    _warm_up(loaded, tasks[0], batch_size)
    ample = Evaluator(loaded, tasks, batch_size, chunk_budget_gb=2**20)
    dataset_states = sum(c.state_bytes for c in ample.chunks) * ample.kept_blocks
    budget = dataset_states * budget_share if budget_share else dataset_states
    evaluator = Evaluator(loaded, tasks, batch_size, chunk_budget_gb=budget / 2**30)
    alone, scratch = _timed(lambda: {c: evaluator.evaluate(c) for c in configs})
    together, stepwide = _timed(lambda: evaluator.evaluate_many(configs))
    diff = max(float(np.abs(_numbers(alone[c]) - _numbers(together[c].scores)).max()) for c in configs)
    return {
        "configs": len(configs),
        "removal_unit": removal_unit,
        "tasks": {t.name: {"n": len(t.examples)} for t in tasks},
        "tokens_per_pass": sum(c.prepared.n_tokens for c in evaluator.chunks),
        "dataset_states_mb": dataset_states / 2**20,
        "chunk_budget_mb": budget / 2**20,
        "kept_states_mb": evaluator.max_state_bytes / 2**20,
        "chunks": len(evaluator.chunks),
        "seconds_stepwide": stepwide,
        "seconds_from_scratch": scratch,
        "speedup": scratch / stepwide,
        "max_abs_diff": diff,
    }


def racing_ceiling(exhaustive: int, candidates_per_step: list[int], width: int, full: int, first: int) -> float:
    """The most any racing rule could save: `exhaustive` example-configurations against the same with
    every candidate outside the beam stopped at the first look (`first` of `full` examples, over the tasks)."""
    saved = sum((m - min(width, m)) * (full - first) for m in candidates_per_step)
    return exhaustive / (exhaustive - saved)


def bench_racing(model: str, tasks: list[str], n: int, folder: str, width: int, max_removed: int, batch_size: int) -> dict:
    """The same beam search (the mean beam) with and without racing, each in a fresh store:
    example-configurations scored, wall time, and whether the recommendations are identical."""
    from search import beam
    from search.cli import run_main

    out = {}
    with tempfile.TemporaryDirectory() as scratch:
        for racing in ("true", "false"):
            uri = f"sqlite:///{scratch}/racing-{racing}.db"
            argv = _beam_argv(model, tasks, n, folder, batch_size, width, max_removed, racing, uri)
            code, seconds = _timed(lambda argv=argv: run_main(beam.main, argv))
            assert code == 0, f"beam search with racing={racing} failed"
            out[racing] = _beam_outcome(uri, seconds)
    on, off = out["true"], out["false"]
    ceiling = racing_ceiling(
        off["example_configs"], off["candidates_per_step"], width, n * len(tasks), look_sizes(n)[0] * len(tasks)
    )
    return {
        "tasks": {t: {"n": n} for t in tasks},
        "beam_width": width,
        "max_removed": max_removed,
        "racing": on,
        "exhaustive": off,
        "eval_ratio": off["example_configs"] / on["example_configs"],
        "eval_ratio_ceiling": ceiling,
        "speedup": off["seconds"] / on["seconds"],
        "same_recommendations": on["picks"] == off["picks"],
    }


def _beam_argv(
    model: str, tasks: list[str], n: int, folder: str, batch_size: int, width: int, max_removed: int, racing: str, uri: str
) -> list[str]:
    """The command line of one side of the racing benchmark: the mean beam, racing `true` or `false`, store `uri`."""
    return [
        "--model",
        model,
        "--tasks",
        ",".join(tasks),
        "--n_samples",
        str(n),
        "--data_dir",
        folder,
        "--batch_size",
        str(batch_size),
        "--dtype",
        "float32",
        "--beam_width",
        str(width),
        "--max_removed",
        str(max_removed),
        "--criterion",
        "mean",
        "--racing",
        racing,
        "--tracking_uri",
        uri,
    ]


def _beam_outcome(uri: str, seconds: float) -> dict:
    """What the beam search in store `uri` scored, stopped and recommended, and its candidates per step."""
    from mlflow.tracking import MlflowClient

    from contract.tracking import load_json

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, "tags.`prunetrack.kind` = 'beam_search'")
    results = load_json(client, run.info.run_id, names.BEAM_RESULTS)
    return {
        "seconds": seconds,
        "example_configs": results["worker"]["examples_scored"],
        "stopped": results["worker"]["stopped"],
        "evaluated": results["worker"]["evaluated"],
        "picks": [e["removed_blocks"] for e in results["recommendations"]],
        "candidates_per_step": [
            len(load_json(client, run.info.run_id, names.beam_step(k))["candidates"])
            for k in range(1, len(results["recommendations"]) + 1)
        ],
    }
