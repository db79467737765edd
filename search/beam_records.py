"""What a beam search records: each candidate's row and each step's best entry (contract.records),
the step metrics, and the results on the parent run (JSON, the recommendation table, the run
description and beam_drops.png). search.beam runs the search; search.procedures records alike."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from contract import names, tracking
from contract.records import BeamResults, Candidate, Recommendation, unit_names
from pruning.drop import drop
from pruning.units import removed_blocks
from search import figures, summaries
from search.configs import Outcome, StudyContext, config_text


def candidate_row(ctx: StudyContext, baseline: dict, outcome: Outcome) -> Candidate:
    """What a step reports about one candidate: metrics and drop per task, or its error. A
    candidate that racing stopped has `drops` None (it is never ranked), its `partial_drops` on
    the examples it saw (`n_examples` per task) and the reason in `stopped`."""
    status = "FAILED" if outcome.error else "STOPPED" if outcome.stopped else "FINISHED"
    removed = outcome.removed
    row = Candidate(
        list(removed_blocks(removed)),
        outcome.conf_hash,
        outcome.run_id,
        status,
        outcome.metrics,
        error=outcome.error,
        removed_units=unit_names(removed),
    )
    if outcome.metrics is not None:
        drops = {t.name: drop(t, baseline[t.name], outcome.metrics[t.name]) for t in ctx.tasks}
        if outcome.stopped:
            row.partial_drops, row.n_examples, row.stopped = drops, outcome.seen, outcome.stopped
        else:
            row.drops, row.mean_drop = drops, float(np.mean(list(drops.values())))
    return row


def best_entry(row: Candidate, k: int, num_blocks: int, previous: float, complete: bool, params: int) -> Recommendation:
    """One line of the recommendation table: removing `k` units (`params` parameters)."""
    drops = list(row.drops.values())
    return Recommendation(
        k,
        row.removed_blocks,
        row.mean_drop,
        float(np.std(drops)),
        len(drops),
        row.mean_drop - previous,
        num_blocks - len(row.removed_blocks),
        [b for b in range(num_blocks) if b not in row.removed_blocks],
        row.drops,
        row.config_hash,
        row.run_id,
        complete,
        row.removed_units,
        params,
    )


def log_step(ctx: StudyContext, criteria_names: list[str], best: dict[str, list[Recommendation]], k: int) -> None:
    """Step k's metrics on the parent run: the main beam's best entry and each task beam's best drop."""
    metrics = {}
    main = best[criteria_names[0]]
    if len(main) == k:
        entry = main[-1]
        metrics = {
            "mean_drop": entry.mean_drop,
            "std_drop": entry.std_drop,
            "incremental_drop": entry.incremental_drop,
            **{f"drop/{t}": d for t, d in entry.drops.items()},
        }
    metrics.update({f"best_drop/{c}": best[c][-1].drops[c] for c in criteria_names if c != "mean" and len(best[c]) == k})
    tracking.log(ctx.client, ctx.parent_id, metrics=metrics, step=k)


def log_results(ctx: StudyContext, results: BeamResults) -> None:
    """The search's results on the parent run: baseline and counts, recommended tags, results JSON,
    the recommendation table, the run description and beam_drops.png."""
    baseline = {names.baseline_metric(names.metric(m, t)): v for t, ms in results.baseline.items() for m, v in ms.items()}
    counts = {f"configs_{k}": v for k, v in ctx.counts.items()}
    recommended = {names.recommended_tag(e.num_removed): config_text(e.units) for e in results.recommendations}
    tracking.log(
        ctx.client, ctx.parent_id, metrics={**baseline, **counts}, tags={names.FAILED_CONFIGS: len(results.failed), **recommended}
    )
    tracking.log_json(ctx.client, ctx.parent_id, names.BEAM_RESULTS, results.to_json())
    ctx.client.log_text(ctx.parent_id, summary(results), names.BEAM_TABLE)
    reuse = summaries.mark_reuse(ctx.client, ctx.parent_id, ctx.counts)
    tracking.describe(ctx.client, ctx.parent_id, summaries.beam_description(results, ctx.identity, reuse))
    if results.recommendations:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / names.BEAM_DROPS_PLOT
            figures.plot_beam_drops(results, ctx.identity, path)
            ctx.client.log_artifact(ctx.parent_id, str(path))


def summary(results: BeamResults) -> str:
    """The recommendation table (markdown), per-task bests, and failures."""
    criterion = results.settings["criterion"]
    ranking = "mean drop over the tasks" if criterion in ("mean", "all") else f"drop on {criterion}"
    unit = results.settings.get("removal_unit", "block")
    what = f"of {results.num_blocks} blocks" if unit == "block" else f"units ({unit}s) of {results.num_blocks} blocks"
    lines = [
        f"## Removing 1..{len(results.recommendations)} {what} (ranked by {ranking}; tasks: {', '.join(results.tasks)})",
        "",
        "| removed | blocks | mean drop | std | datasets | increment | active blocks |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in results.recommendations:
        flag = "" if e.complete else " (some candidates failed)"
        lines.append(
            f"| {e.num_removed} | {summaries.shown(e.units)}{flag} | {e.mean_drop:.4f} | {e.std_drop:.4f} "
            f"| {e.n_datasets} | {e.incremental_drop:+.4f} | {e.num_active_blocks} -> {e.active_blocks} |"
        )
    if results.per_task:
        lines.append("")
    for task, entries in results.per_task.items():
        lines.append(f"best on {task}: " + ", ".join(f"{summaries.shown(e.units)} ({e.drops[task]:.4f})" for e in entries))
    if results.failed:
        lines.append(
            f"\nFAILED configurations ({len(results.failed)}), not ranked: "
            + "; ".join(f"{summaries.shown(f.units)}: {f.error}" for f in results.failed)
        )
    return "\n".join(lines) + "\n"
