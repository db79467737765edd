"""Which criterion, which search: the held-out comparison of pruning methods, read from the store.

    python -m analysis.compare_methods [--run_id R | --experiment E] [--n_resamples B] [--seed S]

Reads a `method_selection` run (search.compare; the latest FINISHED one unless --run_id): each method's
configuration for k = 1..K, chosen on the selection split, and the configuration runs that scored it on
the scoring split (metrics and `per_example/<task>.json`), plus every criterion's per-unit scores.
Writes, as the artifacts of a `compare_methods` run:
- `compare_methods.json`: `methods`, `k`, `scores` (per method and k: the headline metric per task,
  `headline_mean` over the multiple-choice tasks, the perplexity tasks' word perplexity, the fraction
  of parameters removed, the removed units), `ci` (per k: the best method by headline_mean, and per
  method a percentile interval of its headline_mean and of its paired difference from the best, from
  resampling the scoring examples within each task, the same resamples for every method),
  `criterion_correlation` (Spearman and Kendall correlation of each cheap criterion with the measured
  drop per block on the selection split, with intervals from resampling blocks), the splits, n and seed;
- `compare_methods.tex`: headline_mean per method and k, the best of each k in bold;
- `compare_methods.png`: headline_mean against the fraction of parameters removed, one line per
  method, with its interval as a band.
"""

from __future__ import annotations

from analysis.settings import CompareMethodsSettings, check_bootstrap
from analysis.settings import compare_methods_parser as parser
from contract import cli

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load MLflow
    cli.check_args(parser)

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
from scipy import stats

from analysis import job, store
from analysis.report import latex_table, tex
from analysis.store import AnalysisError
from contract import names, tracking

CHEAP = ("ppl_drop", "block_influence", "angular_distance", "taylor")  # criteria correlated with the measured drop


def select_run(client, run_id: str = "", experiment: str = ""):
    """The method selection run named, else the latest FINISHED one (in `experiment`)."""
    if run_id:
        run = store.get_run(client, run_id)
        if run.data.tags.get(names.KIND) != names.METHOD_SELECTION:
            raise AnalysisError(f"run {run_id} is not a method selection ({names.KIND}={run.data.tags.get(names.KIND)!r})")
        return run
    found = store.runs(client, names.METHOD_SELECTION, experiment)
    if not found:
        raise AnalysisError(
            f"no FINISHED method selection in {client.tracking_uri}"
            + (f", experiment {experiment!r}" if experiment else "")
            + "; run `python -m search.compare` (mlflow run . -e select_methods) first"
        )
    return found[0]


def per_example(client, report: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per scoring run: per multiple-choice task the headline per example (doc order), per perplexity
    task the (nll, words) per document."""
    tasks = report["tasks"]
    run_ids = sorted({r for runs in report["score_runs"].values() for r in runs} | {report["baseline_run"]})
    items = [(r, names.per_example(t["name"])) for r in run_ids for t in tasks]
    data = dict(zip(items, store.read_json_many(client, items)))
    values, doc_ids = {}, {}
    for r in run_ids:
        values[r] = {}
        for t in tasks:
            d = data[(r, names.per_example(t["name"]))]
            if doc_ids.setdefault(t["name"], d["doc_id"]) != d["doc_id"]:
                raise AnalysisError(f"run {r} scored other examples of {t['name']} than the other methods: not paired")
            if t["kind"] == "multiple_choice":
                values[r][t["name"]] = np.array(d[t["headline"]], dtype=float)
            else:
                values[r][t["name"]] = np.array([d["nll"], d["words"]], dtype=float)
    return values


def _headline_mean(values: dict[str, np.ndarray], mc: list[str], picks: dict[str, np.ndarray]) -> np.ndarray:
    """headline_mean over the resamples `picks` (task -> (B, n) indices)."""
    return np.mean([values[t][picks[t]].mean(axis=1) for t in mc], axis=0)


def compare(report: dict, values: dict, n_resamples: int, level: float, seed: int) -> dict:
    """Scores, bootstrap intervals and criterion correlations (see the module docstring)."""
    tasks = report["tasks"]
    mc = [t["name"] for t in tasks if t["kind"] == "multiple_choice"]
    ppl = [t["name"] for t in tasks if t["kind"] == "perplexity"]
    if not mc:
        raise AnalysisError("the method selection has no multiple-choice task: no headline_mean to compare")
    rng = np.random.default_rng(seed)
    base = values[report["baseline_run"]]
    picks = {t: rng.integers(0, len(base[t]), (n_resamples, len(base[t]))) for t in mc}
    tail = (1 - level) / 2 * 100
    scores, ci = {}, {}
    boot = {}
    for m in report["methods"]:
        scores[m] = {}
        for i, k in enumerate(report["k"]):
            v = values[report["score_runs"][m][i]]
            entry = {t["name"]: float(v[t["name"]].mean()) for t in tasks if t["name"] in mc}
            entry["headline_mean"] = float(np.mean([entry[t] for t in mc]))
            for t in ppl:
                nll, words = v[t]
                entry[f"word_perplexity_{t}"] = math.exp(nll.sum() / words.sum())
            entry["fraction_removed"] = report["fraction_removed"][m][i]
            entry["removed"] = report["selected"][m][i]
            scores[m][str(k)] = entry
            boot[(m, k)] = _headline_mean(v, mc, picks)
    for k in report["k"]:
        best = max(report["methods"], key=lambda m: scores[m][str(k)]["headline_mean"])
        ci[str(k)] = {"best": best, "methods": {}}
        for m in report["methods"]:
            diff = boot[(m, k)] - boot[(best, k)]
            ci[str(k)]["methods"][m] = {
                "headline_mean": list(np.percentile(boot[(m, k)], [tail, 100 - tail])),
                "diff_from_best": scores[m][str(k)]["headline_mean"] - scores[best][str(k)]["headline_mean"],
                "diff_ci": list(np.percentile(diff, [tail, 100 - tail])),
            }
    baseline = {t: float(base[t].mean()) for t in mc}
    baseline["headline_mean"] = float(np.mean(list(baseline.values())))
    return {
        "methods": report["methods"],
        "k": report["k"],
        "scores": scores,
        "baseline": baseline,
        "ci": ci,
        "criterion_correlation": correlations(report["criteria"], n_resamples, level, seed),
        "bootstrap": {
            "n_resamples": n_resamples,
            "seed": seed,
            "level": level,
            "resampled": "scoring examples within each task, paired (the same resamples for every method)",
        },
        "n_examples": {t: len(base[t]) for t in mc},
        "select_split": report["select_split"],
        "score_split": report["score_split"],
        "select_data": report["select_data"],
        "score_data": report["score_data"],
        "cost": report["cost"],
        "model": report["model"],
    }


def correlations(criteria: dict, n_resamples: int, level: float, seed: int) -> dict:
    """Spearman and Kendall correlation of each cheap criterion with the measured drop, per block, with
    percentile intervals from resampling blocks."""
    drop = np.array(criteria["drop"][names.criterion_metric("drop")], dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(drop), (n_resamples, len(drop)))
    tail = (1 - level) / 2 * 100
    found = {}
    for name in CHEAP:
        if name not in criteria:
            continue
        x = np.array(criteria[name][names.criterion_metric(name)], dtype=float)
        entry = {"n_units": len(x), "against": "drop per block (mean over the selection tasks)"}
        for label, fn in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
            r = fn(x, drop).statistic
            resampled = [fn(x[p], drop[p]).statistic for p in picks]
            entry[label] = float(r)
            entry[f"{label}_ci"] = list(np.nanpercentile(resampled, [tail, 100 - tail]))
        found[name] = entry
    return found


def write(result: dict, folder: Path) -> None:
    """compare_methods.json, .tex and .png into `folder`."""
    (folder / names.COMPARE_JSON).write_text(json.dumps(result, indent=2, default=float))
    (folder / names.COMPARE_TABLE).write_text(table(result))
    plot(result, folder / names.COMPARE_PLOT)


def table(result: dict) -> str:
    """headline_mean per method (rows) and k (columns); the best of each k in bold."""
    ks = [str(k) for k in result["k"]]
    rows = []
    for m in result["methods"]:
        cells = []
        for k in ks:
            value = f"{result['scores'][m][k]['headline_mean']:.3f}"
            cells.append(rf"\textbf{{{value}}}" if result["ci"][k]["best"] == m else value)
        rows.append([tex(m), *cells])
    n = ", ".join(f"{t} {c}" for t, c in result["n_examples"].items())
    caption = tex(
        f"headline_mean of {result['model']} after removing k blocks, selected on {result['select_split']}, "
        f"scored on {result['score_split']} (n per task: {n}); best per k in bold"
    )
    return latex_table(["method", *[f"k={k}" for k in ks]], rows, "l" + "r" * len(ks), caption, "tab:compare-methods") + "\n"


def plot(result: dict, path: Path) -> None:
    """headline_mean against the fraction of parameters removed, one line per method, interval bands."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global figure state

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    base = result["baseline"]["headline_mean"]
    for m in result["methods"]:
        ks = [str(k) for k in result["k"]]
        x = [0.0] + [result["scores"][m][k]["fraction_removed"] for k in ks]
        y = [base] + [result["scores"][m][k]["headline_mean"] for k in ks]
        lo = [base] + [result["ci"][k]["methods"][m]["headline_mean"][0] for k in ks]
        hi = [base] + [result["ci"][k]["methods"][m]["headline_mean"][1] for k in ks]
        (line,) = ax.plot(x, y, marker=".", label=m)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12)
    level = result["bootstrap"]["level"]
    ax.set_xlabel("fraction of parameters removed")
    ax.set_ylabel(f"headline_mean on {result['score_split']} ({level:.0%} bootstrap band)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    """The comparison as a markdown table for the terminal and the README."""
    ks = [str(k) for k in result["k"]]
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "| --- |" + " --- |" * len(ks)]
    for m in result["methods"]:
        cells = []
        for k in ks:
            c = result["ci"][k]["methods"][m]
            value = f"{result['scores'][m][k]['headline_mean']:.3f}"
            cells.append(
                f"**{value}**" if result["ci"][k]["best"] == m else f"{value} ({c['diff_ci'][0]:+.3f}, {c['diff_ci'][1]:+.3f})"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Run the analysis: `python -m analysis.compare_methods ...` or `mlflow run . -e compare_methods`."""
    args = parser().parse_args(argv)
    settings = cli.settings_from(CompareMethodsSettings, args)
    check_bootstrap(settings.n_resamples, settings.ci_level)
    client = tracking.connect(args.tracking_uri or None)
    run = select_run(client, settings.run_id, settings.experiment)
    report = store.read_json(client, run.info.run_id, names.METHOD_SELECTION_REPORT)
    result = compare(report, per_example(client, report), settings.n_resamples, settings.ci_level, settings.seed)
    result["method_selection_run_id"] = run.info.run_id
    params = {"method_selection_run_id": run.info.run_id, "n_resamples": settings.n_resamples, "seed": settings.seed}
    run_id = job.publish(client, names.COMPARE_METHODS, params, partial(write, result), args.output_dir)
    print(markdown(result) + f"method selection run: {run.info.run_id}\nanalysis run: {run_id}")


if __name__ == "__main__":
    raise SystemExit(job.run_main(main))
