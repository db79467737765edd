"""Block sensitivity: the baseline plus every single-block removal, per task, tracked in MLflow.

importance[i] = baseline accuracy - accuracy without block i (multiple choice), or
log(perplexity without block i) - log(baseline perplexity) (perplexity tasks).
The study's `importance` metric is the mean of the per-task importances. With removal_unit
`sublayer` (or `both`), each block's attention and MLP sublayers are removed alone too, and
their importances are logged beside the blocks' (`importance_attn/<task>`, `importance_mlp/<task>`).
"""

from __future__ import annotations

from contract import cli
from search.settings import SensitivitySettings
from search.settings import sensitivity_parser as parser

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load torch
    cli.check_args(parser)

import tempfile
from pathlib import Path

import numpy as np

from contract import names, tracking
from contract.records import SensitivityReport
from pruning.drop import drop
from pruning.units import ATTENTION, MLP, Unit
from search import monitoring, summaries
from search.cli import run_main
from search.configs import StudyContext, config_text, evaluate_configs, run_label
from search.context import open_context, study_params


def run_sensitivity(ctx: StudyContext, removal_unit: str = "block") -> SensitivityReport:
    """Evaluate the baseline and each single-block removal (with removal_unit `sublayer` or `both`,
    each single sublayer too); log importances to the parent run."""
    n = ctx.evaluator.loaded.num_blocks
    kinds = ("b",) if removal_unit == "block" else ("b", ATTENTION, MLP)
    configs = [()] + [(Unit(i, kind),) for kind in kinds for i in range(n)]
    outcomes = evaluate_configs(ctx, configs, desc=names.SENSITIVITY)
    failed = [o for o in outcomes.values() if o.error]
    if failed:
        raise RuntimeError(f"{run_label(failed[0].removed)} could not be evaluated: {failed[0].error}")
    baseline = outcomes[()].metrics

    def importance(kind: str) -> dict[str, list[float]]:
        return {
            t.name: [drop(t, baseline[t.name], outcomes[(Unit(i, kind),)].metrics[t.name]) for i in range(n)] for t in ctx.tasks
        }

    blocks = importance("b")
    report = SensitivityReport(
        baseline,
        n,
        blocks,
        {t.name: [outcomes[(Unit(i),)].metrics[t.name] for i in range(n)] for t in ctx.tasks},
        np.mean(list(blocks.values()), axis=0).tolist(),
        {config_text(r) or "baseline": outcomes[r].run_id for r in configs},
        dict(ctx.counts),
    )
    if removal_unit != "block":
        report.importance_attn, report.importance_mlp = importance(ATTENTION), importance(MLP)
    _log_report(ctx, report)
    return report


def _log_report(ctx: StudyContext, report: SensitivityReport) -> None:
    client, run_id = ctx.client, ctx.parent_id
    for task, values in report.importance.items():
        tracking.log_series(client, run_id, names.importance(task), values)
    tracking.log_series(client, run_id, "importance", report.importance_mean)
    baseline = {names.baseline_metric(names.metric(m, t)): v for t, ms in report.baseline.items() for m, v in ms.items()}
    order = [int(i) for i in np.argsort(-np.array(report.importance_mean), kind="stable")]
    tags = {names.MOST_IMPORTANT: ",".join(map(str, order[:5])), names.LEAST_IMPORTANT: ",".join(map(str, order[::-1][:5]))}
    tracking.log(
        client,
        run_id,
        metrics={**baseline, "configs_evaluated": report.counts["evaluated"], "configs_reused": report.counts["reused"]},
        tags=tags,
    )
    tracking.log_json(client, run_id, names.SENSITIVITY_REPORT, report.to_json())
    reuse = summaries.mark_reuse(client, run_id, report.counts)
    tracking.describe(client, run_id, summaries.sensitivity_description(report, ctx.identity, reuse))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / names.IMPORTANCE_PLOT
        plot_importance(report, path)
        client.log_artifact(run_id, str(path))
        if report.importance_attn is not None:
            for task in report.importance:
                tracking.log_series(client, run_id, names.importance_attn(task), report.importance_attn[task])
                tracking.log_series(client, run_id, names.importance_mlp(task), report.importance_mlp[task])
            path = Path(tmp) / names.SUBLAYER_IMPORTANCE_PLOT
            plot_sublayer_importance(report, path, _plot_title(ctx))
            client.log_artifact(run_id, str(path))


def _plot_title(ctx: StudyContext) -> str:
    sizes = sorted({t["n"] for t in ctx.identity["tasks"]})
    n = f"n={sizes[0]} per task" if len(sizes) == 1 else f"n={sizes[0]}-{sizes[-1]} per task"
    return f"{ctx.identity['model']}: attention vs MLP importance per block\n{', '.join(t.name for t in ctx.tasks)} ({n})"


def plot_sublayer_importance(report: SensitivityReport, path: Path, title: str) -> None:
    """Each block's attention and MLP importance (mean over the tasks) side by side, the whole
    block's as a line."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global figure state

    blocks = np.arange(report.num_blocks)
    attn = np.mean(list(report.importance_attn.values()), axis=0)
    mlp = np.mean(list(report.importance_mlp.values()), axis=0)
    fig = Figure(figsize=(max(7, report.num_blocks * 0.35), 4))
    ax = fig.subplots()
    ax.bar(blocks - 0.2, attn, width=0.4, color="tab:blue", label="attention removed")
    ax.bar(blocks + 0.2, mlp, width=0.4, color="tab:orange", label="MLP removed")
    ax.plot(blocks, report.importance_mean, color="black", marker=".", linewidth=1, label="whole block removed")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("block")
    ax.set_ylabel("importance: drop vs the\nunpruned model (mean over tasks)", fontsize=8)
    ax.set_xticks(blocks)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_importance(report: SensitivityReport, path: Path) -> None:
    """Bar chart of each block's importance, one panel per task plus the mean."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global figure state

    panels = list(report.importance.items()) + [("mean", report.importance_mean)]
    fig = Figure(figsize=(max(6, report.num_blocks * 0.3), 2.2 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], panels):
        ax.bar(range(len(values)), values, color=["tab:red" if v == max(values) else "tab:blue" for v in values])
        ax.set_title(f"importance: {name}", fontsize=9)
        ax.set_xticks(range(len(values)))
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("block")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(report: SensitivityReport, k: int = 5) -> str:
    """The most and least important blocks, for the terminal."""
    mean = np.array(report.importance_mean)
    order = np.argsort(-mean)
    top = ", ".join(f"{i} ({mean[i]:.3f})" for i in order[:k])
    bottom = ", ".join(f"{i} ({mean[i]:.3f})" for i in order[::-1][:k])
    counts = report.counts
    return (
        f"most important blocks:  {top}\nleast important blocks: {bottom}\n"
        f"configurations evaluated: {counts['evaluated']}, reused from the store: {counts['reused']}"
    )


def main(argv=None) -> None:
    """Run a sensitivity study: `python -m search.sensitivity ...` or `mlflow run . -e sensitivity`."""
    args = parser().parse_args(argv)
    settings = cli.settings_from(SensitivitySettings, args)
    client = tracking.connect(args.tracking_uri or None)
    experiment = f"{names.SENSITIVITY}/{settings.model}"
    with (
        tracking.study_run(client, names.SENSITIVITY, experiment, study_params(settings)) as (run_id, exp_id),
        monitoring.system_metrics(client, run_id, settings.system_metrics, settings.device),
    ):
        ctx = open_context(settings, client, run_id, exp_id)
        report = run_sensitivity(ctx, settings.removal_unit)
    print(summary(report))
    print(f"parent run: {run_id}\nsee it: {tracking.ui_hint(client.tracking_uri)}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
