"""Figures of search runs, readable without the run around them: titled with model, tasks and n,
every point labelled with what was removed, drops of different units on separate panels."""

from __future__ import annotations

from pathlib import Path

from contract import naming
from contract.records import BeamResults
from search.configs import config_text
from search.summaries import drop_unit

UNIT_TITLES = {"Δ acc": "accuracy lost (fraction)", "Δ log-ppl": "log-perplexity increase", "Δ score": "score lost"}


def plot_beam_drops(results: BeamResults, identity: dict, path: Path):
    """beam_drops.png: the recommended configuration's drop per task against blocks removed, one panel
    per drop unit (accuracy, log-perplexity, score), each x position labelled with the removed set;
    with tasks of several units a last panel shows the ranking score (mean over tasks, ± std). Returns the figure."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global figure state

    entries = results.recommendations
    k = [0] + [e.num_removed for e in entries]
    ticks = ["0\nnone"] + [f"{e.num_removed}\n[{config_text(e.units)}]" for e in entries]
    by_unit: dict[str, list[str]] = {}
    for task in results.tasks:
        by_unit.setdefault(drop_unit(results.baseline[task]), []).append(task)
    panels = [(unit, tasks) for unit, tasks in by_unit.items()] + ([("mean", [])] if len(by_unit) > 1 else [])
    fig = Figure(figsize=(max(6.5, 1.1 * len(k)), 3.2 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    mean = [0.0] + [e.mean_drop for e in entries]
    std = [0.0] + [e.std_drop for e in entries]
    for ax, (unit, tasks) in zip(axes, panels):
        for task in tasks:
            values = [0.0] + [e.drops[task] for e in entries]
            ax.plot(k, values, marker="o", linewidth=1.2, label=task)
            for x, y in zip(k[1:], values[1:]):
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        if unit == "mean" or len(by_unit) == 1:
            ax.errorbar(k, mean, yerr=std, marker="s", color="black", linewidth=2, capsize=3, label="mean over tasks ± std")
        ax.set_title(
            "ranking score: mean drop over tasks (mixed units)" if unit == "mean" else f"{UNIT_TITLES[unit]} ({unit})",
            fontsize=9,
        )
        ax.set_ylabel("mean drop" if unit == "mean" else unit)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.margins(y=0.15)
        ax.set_xticks(k, ticks, fontsize=7)
        ax.legend(fontsize=7)
    what = "blocks" if results.settings.get("removal_unit", "block") == "block" else "units"
    axes[-1].set_xlabel(f"{what} removed (the recommended set for each number)")
    n = identity.get("n_samples") or "all"
    fig.suptitle(
        f"{naming.model_label(results.model)}: {what} to remove (beam width {results.settings['beam_width']})\n"
        f"tasks {', '.join(results.tasks)}; n={n} per task; drop vs the unpruned model",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
