"""Taylor-importance global width pruning as one tracked MLflow run.

Calibrate, score every attention KV group and MLP channel by first- (or second-) order
Taylor importance, remove `pruning_ratio` of the prunable parameters globally, then
evaluate the smaller model. The run holds the parameters, the zero-shot accuracies and
their mean, the perplexity, the gradient statistics (per layer with step=layer, and the
cross-layer ratios and ranges), the per-layer pruning rates, the group importances and
the pruned model itself.
"""

from __future__ import annotations

from contract import cli
from search.settings import PruneSettings
from search.settings import prune_parser as parser

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load torch
    cli.check_args(parser)

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from contract import names, tracking
from pruning import taylor
from pruning.calibration import calibration_batches
from pruning.compile import compile_blocks, use_compile
from pruning.encoding import max_length_of
from pruning.evaluate import Evaluator
from pruning.models import load_model
from pruning.tasks import load_task, parse_task_list
from search import progress
from search.cli import run_main
from search.configs import StudyContext, convention_tags, evaluate_configs, headline_mean, ppl_window, study_identity

LAYER_SERIES = (
    "layer_pruning_rate",
    "layer_heads_kept",
    "layer_channels_kept",
    "layer_grad_norm",
    "layer_grad_mean",
    "layer_grad_std",
    "layer_grad_max",
)


def prune_and_evaluate(client, run_id: str, exp_id: str, settings: PruneSettings) -> dict[str, float]:
    """Prune the model as `settings` say, logging everything to run `run_id`; returns its metrics.

    Every check that needs no computation (options, tasks, calibration source, model family,
    sequence length against the model's context) runs before the first forward pass.
    """
    settings.check()
    tasks = _load_tasks(settings)
    loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype, revision=settings.revision or None)
    taylor.check_family(loaded.model)
    batches = calibration_batches(
        loaded.tokenizer,
        settings.calibration,
        settings.taylor_seq_len,
        settings.taylor_num_samples,
        settings.seed,
        settings.taylor_batch_size,
        max_length_of(loaded.model),
    )
    evaluator = Evaluator(loaded, tasks, settings.batch_size, compile=use_compile(settings.compile, loaded.device))
    tracking.log(
        client,
        run_id,
        params={"num_blocks": loaded.num_blocks, "model_revision": loaded.revision, **ppl_window(evaluator, tasks)},
        tags=convention_tags(tasks),
    )

    metrics: dict[str, float] = {}
    if settings.baseline:
        metrics.update(_baseline_metrics(client, run_id, exp_id, evaluator, tasks, settings))

    start = time.perf_counter()
    groups, stats, report = _prune(loaded.model, batches, settings)
    metrics["taylor_seconds"] = time.perf_counter() - start
    compile_blocks(loaded.blocks, False)  # pruned blocks differ in width: one compilation each would cost more than it saves

    start = time.perf_counter()
    with progress.Progress("scoring the pruned model", evaluator.n_tokens, "token") as bar:
        scores = evaluator.evaluate((), bar)
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics.update(_task_metrics({t: s.metrics for t, s in scores.items()}, tasks, settings.ppl_task))
    metrics.update({f"n_{s.task}": s.n for s in scores.values()})
    metrics.update(taylor.gradient_summary(stats))
    metrics.update(
        n_params_before=report.n_params_before,
        n_params_after=report.n_params_after,
        pruning_rate=1 - report.n_params_after / report.n_params_before,
        pruned_fraction=report.pruned_fraction,
        extreme_pruning_layers=report.extreme_pruning_layers,
    )
    _log(client, run_id, loaded, metrics, report, groups, stats, scores, settings)
    return metrics


def _load_tasks(settings: PruneSettings) -> list:
    """The tasks of `settings`, with `ppl_task` among them."""
    task_names = parse_task_list(settings.tasks)
    if settings.ppl_task and settings.ppl_task not in task_names:
        task_names.append(settings.ppl_task)
    return [
        load_task(n, settings.split, settings.n_samples or None, settings.seed, settings.data_dir or None, settings.sample)
        for n in task_names
    ]


def _baseline_metrics(client, run_id: str, exp_id: str, evaluator, tasks, settings: PruneSettings) -> dict[str, float]:
    """`baseline_` metrics of the unpruned model, a configuration run shared with every study on the same data."""
    loaded = evaluator.loaded
    identity = study_identity(loaded, tasks, settings.split, settings.n_samples, settings.seed, settings.sample)
    ctx = StudyContext(client, exp_id, run_id, evaluator, identity)
    base = evaluate_configs(ctx, [()], desc="baseline")[()]
    if base.error:
        raise RuntimeError(f"the baseline (no block removed) could not be evaluated: {base.error}")
    return _task_metrics(base.metrics, tasks, settings.ppl_task, prefix="baseline_")


def _prune(model, batches, settings: PruneSettings) -> tuple:
    """Taylor importance of every group from the calibration batches, then global pruning as `settings` say:
    (groups, gradient statistics, taylor.PruneReport)."""
    with progress.phase(f"Taylor importance ({settings.taylor_order} order, {settings.taylor_num_samples} sequences)"):
        groups, stats = taylor.taylor_importance(model, batches, order=settings.taylor_order)
    report = taylor.global_prune(
        model,
        groups,
        settings.pruning_ratio,
        normalization=settings.normalization,
        protect_first_last=settings.protect_first_last,
        max_layer_rate=settings.max_layer_rate,
        extreme_threshold=settings.extreme_threshold,
    )
    return groups, stats, report


def _task_metrics(by_task: dict[str, dict[str, float]], tasks, ppl_task: str, prefix: str = "") -> dict[str, float]:
    """`<metric>_<task>` for every task; over the multiple-choice tasks `acc_mean` (mean `acc`) and
    `headline_mean` (mean of each task's headline metric); `ppl` of `ppl_task`."""
    out = {prefix + names.metric(m, task): v for task, ms in by_task.items() for m, v in ms.items()}
    accs = [by_task[t.name]["acc"] for t in tasks if t.kind == "multiple_choice"]
    if accs:
        out[prefix + "acc_mean"] = float(np.mean(accs))
        out[prefix + "headline_mean"] = headline_mean(by_task, tasks)
    if ppl_task:
        out[prefix + "ppl"] = by_task[ppl_task]["ppl"]
    return out


def _log(client, run_id, loaded, metrics, report, groups, stats, scores, settings) -> None:
    tracking.log(client, run_id, metrics=metrics)
    series = {
        "layer_pruning_rate": report.layer_rates,
        "layer_heads_kept": report.heads_kept,
        "layer_channels_kept": report.channels_kept,
        "layer_grad_norm": [s.norm for s in stats],
        "layer_grad_mean": [s.mean_abs for s in stats],
        "layer_grad_std": [s.std for s in stats],
        "layer_grad_max": [s.max_abs for s in stats],
    }
    for name in LAYER_SERIES:
        tracking.log_series(client, run_id, name, series[name])
    tracking.log_json(client, run_id, names.PRUNE_REPORT, {"settings": asdict(settings), "metrics": metrics, **series})
    tracking.log_per_example(client, run_id, scores.values())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "group_importance.npz"
        np.savez_compressed(
            path,
            **{f"heads_{b}": g.head_importance.numpy() for b, g in enumerate(groups)},
            **{f"channels_{b}": g.channel_importance.numpy() for b, g in enumerate(groups)},
        )
        client.log_artifact(run_id, str(path))
        if settings.save_model:
            taylor.save_pruned(loaded.model, loaded.tokenizer, Path(tmp) / "pruned_model")
            client.log_artifacts(run_id, str(Path(tmp) / "pruned_model"), "pruned_model")


def main(argv=None) -> None:
    """Prune and evaluate one model: `python -m search.prune ...` or `mlflow run . -e prune`."""
    args = parser().parse_args(argv)
    settings = cli.settings_from(PruneSettings, args)
    settings.check()
    client = tracking.connect(args.tracking_uri or None)
    with tracking.study_run(client, names.PRUNE, f"{names.PRUNE}/{settings.model}", asdict(settings)) as (run_id, exp_id):
        metrics = prune_and_evaluate(client, run_id, exp_id, settings)
    shown = ", ".join(
        f"{k} {metrics[k]:.4g}" for k in ("acc_mean", "headline_mean", "ppl", "grad_norm_ratio", "pruning_rate") if k in metrics
    )
    print(f"pruned {settings.model} by {settings.pruning_ratio:g}: {shown}\nrun: {run_id}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
