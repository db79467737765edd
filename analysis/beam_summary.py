"""The cross-dataset recommendation table of a beam search: which blocks to remove, 1..k at a time.

    python -m analysis.beam_summary [--run_id R | --experiment E] [--model M] [--task_types task=type,...]

Reads `beam_search_results.json` of a beam search run (`prunetrack.kind=beam_search`; the latest
FINISHED one unless --run_id) and tabulates its `recommendations`: the blocks removed, the mean
drop over the datasets +- its standard deviation, a t interval for the mean, how many datasets,
and the increment over one block fewer. When tasks carry a type (the run's `task_type/<task>` tags,
or --task_types) and the entries hold per-task `drops`, the mean drop per task type is added.
"""

from __future__ import annotations

from analysis.settings import BeamSummarySettings
from analysis.settings import beam_summary_parser as parser
from contract import cli

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load MLflow
    cli.check_args(parser)

import json
import math
from functools import partial
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no backend or global figure state
from scipy import stats

from analysis import job, store
from analysis.report import latex_table, tex
from analysis.store import AnalysisError
from contract import names, tracking
from contract.records import BeamResults


def select_run(client, run_id: str = "", experiment: str = "", model: str = ""):
    """The beam search run named, else the latest FINISHED one (of `model`, in `experiment`)."""
    if run_id:
        run = store.get_run(client, run_id)
        if run.data.tags.get(names.KIND) != names.BEAM_SEARCH:
            raise AnalysisError(f"run {run_id} is not a beam search ({names.KIND}={run.data.tags.get(names.KIND)!r})")
        return run
    found = [r for r in store.runs(client, names.BEAM_SEARCH, experiment) if not model or r.data.params.get("model") == model]
    if not found:
        raise AnalysisError(
            f"no FINISHED beam search{f' of model {model!r}' if model else ''} in {client.tracking_uri}"
            + (f", experiment {experiment!r}" if experiment else "")
        )
    return found[0]


def parse_types(text: str) -> dict[str, str]:
    """{task: type} from 'okvqa=vqa,coco_caption=captioning'."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    if any(p.count("=") != 1 or not all(p.split("=")) for p in pairs):
        raise AnalysisError(f"task_types {text!r} is not a list of task=type; allowed: e.g. okvqa=vqa,coco_caption=captioning")
    return dict(p.split("=") for p in pairs)


def summarize(results: BeamResults, task_types: dict[str, str], level: float = 0.95) -> dict:
    """The table rows (with a t interval of the mean drop over datasets) and the per-type means."""
    rows = []
    for e in results.recommendations:
        n, std = e.n_datasets, e.std_drop
        # std_drop is the spread over the n datasets (ddof 0), so the standard error is std / sqrt(n - 1)
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n - 1)) if n > 1 else None
        rows.append(
            {
                names.NUM_REMOVED: e.num_removed,
                names.REMOVED_BLOCKS: e.removed_blocks,
                names.REMOVED_UNITS: [str(u) for u in e.units],
                "mean_drop": e.mean_drop,
                "std_drop": std,
                "ci_low": e.mean_drop - half if half is not None else None,
                "ci_high": e.mean_drop + half if half is not None else None,
                "n_datasets": n,
                "incremental_drop": e.incremental_drop,
                "active_blocks": e.active_blocks,
            }
        )
    groups = {}
    for kind in sorted(set(task_types.values())):
        tasks = sorted(t for t, k in task_types.items() if k == kind and t in results.tasks)
        if tasks:
            per_k = [sum(e.drops[t] for t in tasks) / len(tasks) for e in results.recommendations]
            groups[kind] = {
                "tasks": tasks,
                "n_tasks": len(tasks),
                "mean_drop_by_num_removed": per_k,
                "mean_drop": sum(per_k) / len(per_k),
            }
    return {
        "model": results.model,
        "tasks": results.tasks,
        "num_blocks": results.num_blocks,
        "criterion": results.settings.get("criterion"),
        "ci_level": level,
        "rows": rows,
        "task_types": task_types,
        "groups": groups,
    }


def markdown(summary: dict) -> str:
    """beam_summary.md: the recommendation table and the per-type means."""
    pct = round(100 * summary["ci_level"])
    lines = [
        f"## Blocks to remove: {summary['model']} ({summary['num_blocks']} blocks, drops over {summary['tasks']})",
        "",
        f"| removed | blocks | mean drop ± std | {pct}% CI of the mean | datasets | increment | active blocks |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rows"]:
        ci = "n/a" if r["ci_low"] is None else f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
        lines.append(
            f"| {r[names.NUM_REMOVED]} | {', '.join(_removed(r))} | {r['mean_drop']:.4f} ± "
            f"{r['std_drop']:.4f} | {ci} | {r['n_datasets']} | {r['incremental_drop']:+.4f} | "
            f"{len(r['active_blocks'])} |"
        )
    if summary["groups"]:
        lines += ["", "| task type | tasks | mean drop over 1..k removed | by number removed |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {kind} | {', '.join(g['tasks'])} (n={g['n_tasks']}) | {g['mean_drop']:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in g['mean_drop_by_num_removed'])} |"
            for kind, g in summary["groups"].items()
        ]
    return "\n".join(lines) + "\n"


def _removed(row: dict) -> list[str]:
    """What a row removes: its block indices, or its unit names when it removes sublayers."""
    whole = len(row[names.REMOVED_UNITS]) == len(row[names.REMOVED_BLOCKS])
    return [str(b) for b in row[names.REMOVED_BLOCKS]] if whole else row[names.REMOVED_UNITS]


def latex(summary: dict) -> str:
    """beam_table.tex."""
    rows = [
        [
            str(r[names.NUM_REMOVED]),
            ", ".join(_removed(r)),
            f"{r['mean_drop']:.4f} $\\pm$ {r['std_drop']:.4f}",
            "--" if r["ci_low"] is None else f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]",
            str(r["n_datasets"]),
            f"{r['incremental_drop']:+.4f}",
        ]
        for r in summary["rows"]
    ]
    pct = round(100 * summary["ci_level"])
    caption = (
        f"Blocks to remove from {tex(summary['model'])} ({summary['num_blocks']} blocks): beam search, mean drop over "
        f"the datasets $\\pm$ standard deviation, {pct}\\% $t$ interval of the mean, increment over one block fewer."
    )
    header = ["Removed", "Blocks", r"Mean drop $\pm$ std", f"{pct}\\% CI", "Datasets", "Increment"]
    return latex_table(header, rows, "rlcccr", caption, "tab:beam")


def plot(summary: dict, path: Path) -> None:
    """beam_drops.png: mean drop against blocks removed, with the interval of the mean."""
    rows = summary["rows"]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    k = [r[names.NUM_REMOVED] for r in rows]
    mean = [r["mean_drop"] for r in rows]
    err = [
        [m - (r["ci_low"] if r["ci_low"] is not None else m) for m, r in zip(mean, rows)],
        [(r["ci_high"] if r["ci_high"] is not None else m) - m for m, r in zip(mean, rows)],
    ]
    ax.errorbar(k, mean, yerr=err, marker="o", capsize=3)
    for x, y, r in zip(k, mean, rows):
        ax.annotate(",".join(_removed(r)), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("blocks removed")
    ax.set_ylabel("mean drop over datasets")
    ax.set_xticks(k)
    ax.set_title(f"{round(100 * summary['ci_level'])}% t interval of the mean", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(summary: dict, folder: Path) -> None:
    """Every output file into `folder`."""
    (folder / "beam_summary.json").write_text(json.dumps(summary, indent=1))
    (folder / "beam_summary.md").write_text(markdown(summary))
    (folder / "beam_table.tex").write_text(latex(summary))
    plot(summary, folder / names.BEAM_DROPS_PLOT)


def main(argv=None) -> None:
    """Run the analysis: `python -m analysis.beam_summary ...` or `mlflow run . -e beam_summary`."""
    args = parser().parse_args(argv)
    settings = cli.settings_from(BeamSummarySettings, args)
    types = parse_types(settings.task_types)
    client = tracking.connect(args.tracking_uri or None)
    run = select_run(client, settings.run_id, settings.experiment, settings.model)
    results = store.read_record(client, run.info.run_id, names.BEAM_RESULTS, BeamResults)
    if not results.recommendations:
        raise AnalysisError(f"beam search run {run.info.run_id} has no recommendations in {names.BEAM_RESULTS}")
    tagged = {
        k.removeprefix(names.task_type_tag("")): v for k, v in run.data.tags.items() if k.startswith(names.task_type_tag(""))
    }
    summary = {"beam_search_run_id": run.info.run_id, **summarize(results, {**tagged, **types})}
    params = {"beam_search_run_id": run.info.run_id, "task_types": settings.task_types}
    run_id = job.publish(client, names.BEAM_SUMMARY, params, partial(write, summary), args.output_dir)
    print(markdown(summary) + f"beam search run: {run.info.run_id}\nanalysis run: {run_id}")


if __name__ == "__main__":
    raise SystemExit(job.run_main(main))
