"""What a study shows where users look: the run description (tag `mlflow.note.content`, Markdown,
shown at the top of the run page in the MLflow UI), the line a beam step ends with, and names of
a step's configuration runs that sort by their drop.
"""

from __future__ import annotations

import logging

import numpy as np

from contract import names, naming, tracking
from contract.records import BeamResults, SensitivityReport
from pruning.units import Config, is_blocks_only, removed_blocks
from search.configs import config_text
from search.progress import duration

logger = logging.getLogger(__name__)


def shown(config: Config) -> str:
    """A configuration for people: `[3, 5]` (whole blocks, as before sublayers) or `a4,b5`."""
    return str(list(removed_blocks(config))) if is_blocks_only(config) else config_text(config)


def drop_unit(baseline: dict[str, float]) -> str:
    """The unit of a task's drop (pruning.drop.drop), from the task's metrics."""
    if "ppl" in baseline:
        return "Δ log-ppl"
    if "acc" in baseline:
        return "Δ acc"
    return "Δ score"


def _baseline_line(baseline: dict[str, dict[str, float]]) -> str:
    shown = []
    for task, metrics in baseline.items():
        key = "ppl" if "ppl" in metrics else "acc" if "acc" in metrics else "score"
        shown.append(f"{task} {key} {metrics[key]:.4g}")
    return "Baseline (nothing removed): " + ", ".join(shown)


def _counts_line(counts: dict) -> str:
    parts = [f"{counts.get('evaluated', 0)} scored", f"{counts.get('reused', 0)} reused from the store"]
    parts += [f"{counts[k]} {label}" for k, label in (("stopped", "stopped by racing"), ("failed", "failed")) if counts.get(k)]
    return "Configurations: " + ", ".join(parts)


def reused_everything(counts: dict) -> bool:
    """Whether this start scored nothing: every configuration came from the store."""
    return counts.get("reused", 0) > 0 and not any(counts.get(k) for k in ("evaluated", "stopped", "failed"))


def mark_reuse(client, run_id: str, counts: dict) -> str:
    """Tag a study run that scored nothing (`prunetrack.reused_all=true`); the description's opening line."""
    if not reused_everything(counts):
        return ""
    tracking.log(client, run_id, tags={names.REUSED_ALL: "true"})
    return (
        f"> **Nothing was scored by this start:** all {counts['reused']} configurations were reused from the "
        "store (an earlier run of the same study). The numbers below are theirs.\n\n"
    )


def sensitivity_description(report: SensitivityReport, identity: dict, reuse: str = "", k: int = 5) -> str:
    """The most and least important blocks with their importance, the baseline and the counts."""
    mean = np.array(report.importance_mean)
    order = [int(i) for i in np.argsort(-mean, kind="stable")]
    rows = [
        "| block | importance (mean drop) | " + " | ".join(report.importance) + " |",
        "| --- | --- |" + " --- |" * len(report.importance),
    ]

    def row(i: int, tag: str) -> str:
        cells = " | ".join(f"{values[i]:.4f}" for values in report.importance.values())
        return f"| {i} {tag} | {mean[i]:.4f} | {cells} |"

    rows += [row(i, "(most)") for i in order[:k]] + [row(i, "(least)") for i in order[::-1][:k]]
    units = ", ".join(f"{t}: {drop_unit(report.baseline[t])}" for t in report.importance)
    return (
        f"{reuse}### Block sensitivity of {naming.model_label(identity['model'])}\n\n"
        f"Tasks {', '.join(report.importance)}, n={identity['n_samples'] or 'all'} per task, split {identity['split']}; "
        f"{report.num_blocks} blocks, each removed alone. Importance = drop when the block is removed ({units}).\n\n"
        + "\n".join(rows)
        + f"\n\n{_baseline_line(report.baseline)}\n\n{_counts_line(report.counts)}\n"
    )


def beam_table(results: BeamResults) -> list[str]:
    """The recommendation table per number removed: blocks, mean drop ± std over the tasks, each task's drop."""
    units = {t: drop_unit(results.baseline[t]) for t in results.tasks}
    what = "blocks" if all(is_blocks_only(e.units) for e in results.recommendations) else "units"
    lines = [
        f"| k | removed {what} | mean drop ± std | " + " | ".join(f"{t} ({units[t]})" for t in results.tasks) + " |",
        "| --- | --- | --- |" + " --- |" * len(results.tasks),
    ]
    for e in results.recommendations:
        flag = "" if e.complete else " (some candidates failed)"
        drops = " | ".join(f"{e.drops[t]:.4f}" for t in results.tasks)
        lines.append(f"| {e.num_removed} | {config_text(e.units)}{flag} | {e.mean_drop:.4f} ± {e.std_drop:.4f} | {drops} |")
    return lines


def beam_description(results: BeamResults, identity: dict, reuse: str = "") -> str:
    """The recommendation table with the search's model, data and settings, the baseline and the counts."""
    s = results.settings
    ranking = "mean drop over the tasks" if s["criterion"] in ("mean", "all") else f"drop on {s['criterion']}"
    head = (
        f"{reuse}### Blocks to remove from {naming.model_label(results.model)} ({results.num_blocks} blocks)\n\n"
        f"Beam search, width {s['beam_width']}, ranked by {ranking}; tasks {', '.join(results.tasks)}, "
        f"n={identity['n_samples'] or 'all'} per task, split {identity['split']}. "
        "Drops are against the unpruned model; ± is the std over the tasks.\n\n"
    )
    table = "\n".join(beam_table(results)) if results.recommendations else "_No recommendation: nothing could be ranked._"
    tail = f"\n\n{_baseline_line(results.baseline)}\n\n{_counts_line(results.worker)}\n"
    if results.failed:
        tail += f"\n**{len(results.failed)} configurations FAILED** and are not ranked (see `{names.BEAM_RESULTS}`).\n"
    return head + table + tail


def step_line(k: int, steps: int, kept: list, scores: list[float], n_candidates: int, counts: dict, seconds: float) -> str:
    """The one line a beam step ends with: the kept beam with its drops, what was scored, the time."""
    beam = ", ".join(f"{shown(r)} {v:.4f}" for r, v in zip(kept, scores)) or "none"
    extra = f", {counts['stopped']} stopped by racing" if counts.get("stopped") else ""
    return (
        f"beam step {k} of {steps} done in {duration(seconds)}: {n_candidates} candidates "
        f"({counts.get('evaluated', 0)} scored, {counts.get('reused', 0)} reused{extra}); kept {beam}"
    )


def rank_names(client, k: int, order: list, run_ids: dict, labels: dict) -> None:
    """Rename the configuration runs this step scored to `step<k> #<rank> <label>`, rank by drop
    (best first): sorted by name, the MLflow UI lists a step's runs in the order of the beam."""
    width = len(str(len(order)))
    for rank, removed in enumerate(order, 1):
        if run_ids.get(removed):
            client.update_run(run_ids[removed], name=f"step{k} #{str(rank).zfill(width)} {labels[removed]}")


def export_description(source, what: str, report: dict, metrics: dict) -> str:
    """The exported model's size and speed with their intervals, any warning, and the data it was re-scored on;
    `what` says what was removed (`Exported.what`)."""
    dense, pruned = report["dense"], report["pruned"]
    origin = f"{source.kind} run `{source.run_id}`" if source.run_id else "an explicit block list"
    lines = [
        f"### {naming.model_label(source.model)} with {what}\n",
        f"From {origin}. Timed on {report['device_name']} ({report['device']}, {report['dtype']}), batch "
        f"{report['settings']['batch']}, {report['settings']['prompt_len']} prompt + {report['settings']['new_tokens']} "
        f"new tokens, {report['settings']['rounds']} alternating rounds after a warm-up.\n",
        "| | dense | pruned | pruned / dense (95% interval) |",
        "| --- | --- | --- | --- |",
        f"| parameters | {dense['n_params']:,} | {pruned['n_params']:,} | {pruned['n_params'] / dense['n_params']:.3f} |",
        f"| weights (MiB) | {dense['weight_mb']:.1f} | {pruned['weight_mb']:.1f} "
        f"| {pruned['weight_mb'] / dense['weight_mb']:.3f} |",
        f"| peak memory (MiB) | {dense['peak_memory_mb']:.0f} | {pruned['peak_memory_mb']:.0f} "
        f"| {pruned['peak_memory_mb'] / dense['peak_memory_mb']:.3f} |",
    ]
    for phase in ("prefill", "decode"):
        lines.append(
            f"| {phase} tokens/s (median) | {dense[f'{phase}_tokens_per_s']:.1f} | {pruned[f'{phase}_tokens_per_s']:.1f} "
            f"| **{report[f'{phase}_speedup']:.2f}x** "
            f"({report[f'{phase}_speedup_low']:.2f}-{report[f'{phase}_speedup_high']:.2f}x) |"
        )
    lines.append(
        f"\nThe most removing these parameters can give: {report['speedup_bound']:.2f}x (dense/pruned block parameters)."
    )
    lines += [f"\n> **Warning:** {w}" for w in report["warnings"]]
    n = source.n_samples or "all"
    data = f"{', '.join(source.tasks)}, split {source.split}, n={n} per task ({source.sample}, seed {source.seed})"
    scores = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    lines.append(f"\nRe-scored on the source run's data: {data}: {scores}")
    return "\n".join(lines) + "\n"
