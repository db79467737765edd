"""Train vs validation consistency of block importance, from the sensitivity studies in the store.

    python -m analysis.consistency [--model M] [--experiment E] [--threshold 0.9] [--n_resamples 1000]

For each task (dataset) with a FINISHED sensitivity study of the model on both splits (per split,
the latest study that holds the task): Spearman r of the train and validation importance vectors
(one value per block) with its p-value and Kendall's tau, and a bootstrap percentile interval for
r. The bootstrap resamples each split's examples with replacement from the configuration runs'
per-example results, recomputes both importance vectors and r. Consistent when r >= threshold.
"""

from __future__ import annotations

from analysis.settings import ConsistencySettings, check_bootstrap
from analysis.settings import consistency_parser as parser
from contract import cli

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load MLflow
    cli.check_args(parser)

import json
import math
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no backend or global figure state
from mlflow.entities import Run
from scipy import stats

from analysis import job, store
from analysis.consistency_report import latex, summary_text
from analysis.report import stars
from analysis.store import AnalysisError
from contract import names, tracking
from contract.records import SensitivityReport
from pruning.drop import importances

SPLITS = ("train", "validation")
_CHUNK = 100  # bootstrap resamples drawn at once (bounds memory on large splits)


def select_studies(client, model: str = "", experiment: str = "") -> tuple[str, dict[str, dict[str, Run]]]:
    """The model and, per task and split, the latest FINISHED sensitivity study holding the task."""
    found = store.runs(client, names.SENSITIVITY, experiment)
    if model:
        found = [r for r in found if r.data.params.get("model") == model]
    where = f"{client.tracking_uri}" + (f", experiment {experiment!r}" if experiment else "")
    if not found:
        raise AnalysisError(f"no FINISHED sensitivity study{f' of model {model!r}' if model else ''} in {where}")
    models = sorted({r.data.params.get("model", "") for r in found})
    if len(models) > 1:
        raise AnalysisError(f"sensitivity studies of several models in {where}: {', '.join(models)}; choose one with --model")
    chosen: dict[str, dict[str, Run]] = {}
    for run in found:  # newest first: the first study seen per (task, split) is the latest
        split = run.data.params.get("split", "")
        for key in run.data.metrics:
            if key.startswith(names.importance("")) and split in SPLITS:
                chosen.setdefault(key.removeprefix(names.importance("")), {}).setdefault(split, run)
    return models[0], chosen


def examples(results: list[dict]) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-example results of the baseline and each single-block removal (rows, in that order),
    aligned on the baseline's doc ids: (acc, None) for multiple choice, (score, None) for generation
    (VQA) tasks, (nll, tokens) for perplexity."""
    order = results[0]["doc_id"]
    values, tokens = [], []
    for result in results:
        position = {d: i for i, d in enumerate(result["doc_id"])}
        if len(position) != len(order) or any(d not in position for d in order):
            raise AnalysisError(
                f"per-example results of task {result.get('task')!r} cover different examples across "
                "the configurations of one study"
            )
        index = [position[d] for d in order]
        if "nll" in result:
            values.append(np.asarray(result["nll"], float)[index])
            tokens.append(np.asarray(result["tokens"], float)[index])
        else:
            values.append(np.asarray(result["acc"] if "acc" in result else result["score"], float)[index])
    return np.array(values), (np.array(tokens) if tokens else None)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman r of each row of `a` with the same row of `b` (NaN where a row is constant)."""
    ra, rb = stats.rankdata(a, axis=1), stats.rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=1) / np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))


def bootstrap_r(train, validation, n_resamples: int, seed: int) -> np.ndarray:
    """Spearman r of the importance vectors recomputed on `n_resamples` resamples of each split's
    examples (with replacement, independently per split); NaN where a vector came out constant."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - start)
        vectors = []
        for values, tokens in (train, validation):
            n = values.shape[1]
            weights = rng.multinomial(n, np.full(n, 1 / n), size=size).astype(float)
            vectors.append(importances(values, tokens, weights))
        out.append(rowwise_spearman(*vectors))
    return np.concatenate(out)


def _number(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def analyse_task(
    client,
    task: str,
    studies: dict[str, Run],
    reports: dict[str, SensitivityReport],
    threshold: float,
    n_resamples: int,
    seed: int,
    level: float,
) -> dict:
    """Spearman, Kendall and the bootstrap interval for one task."""
    vectors = {s: np.asarray(reports[s].importance[task], float) for s in SPLITS}
    data, kind = {}, None
    for split in SPLITS:
        children = reports[split].child_runs
        ids = [children["baseline"]] + [children[str(i)] for i in range(reports[split].num_blocks)]
        results = store.read_json_many(client, [(r, names.per_example(task)) for r in ids])
        data[split], kind = examples(results), results[0].get("kind")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant vector: r is undefined, reported as null
        r, p = stats.spearmanr(vectors["train"], vectors["validation"])
        tau, tau_p = stats.kendalltau(vectors["train"], vectors["validation"])
    resampled = bootstrap_r(data["train"], data["validation"], n_resamples, seed)
    valid = resampled[np.isfinite(resampled)]
    low, high = np.percentile(valid, [50 * (1 - level), 50 * (1 + level)]) if len(valid) else (None, None)
    return {
        "dataset": task,
        "kind": kind,
        "n_blocks": len(vectors["train"]),
        "n_examples_train": data["train"][0].shape[1],
        "n_examples_validation": data["validation"][0].shape[1],
        "spearman_r": _number(r),
        "p_value": _number(p),
        "kendall_tau": _number(tau),
        "kendall_p_value": _number(tau_p),
        "ci_low": _number(low),
        "ci_high": _number(high),
        "ci_level": level,
        "n_resamples": n_resamples,
        "n_resamples_valid": int(len(valid)),
        "consistent": bool(math.isfinite(r) and r >= threshold),
        "train_run_id": studies["train"].info.run_id,
        "validation_run_id": studies["validation"].info.run_id,
        "importance_train": vectors["train"].tolist(),
        "importance_validation": vectors["validation"].tolist(),
    }


def consistency(
    client,
    model: str = "",
    experiment: str = "",
    threshold: float = 0.9,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Everything the analysis reports (consistency.json)."""
    check_bootstrap(n_resamples, level)
    model, chosen = select_studies(client, model, experiment)
    reports: dict[str, SensitivityReport] = {}
    datasets, skipped = [], {}
    for task, studies in sorted(chosen.items()):
        missing = [s for s in SPLITS if s not in studies]
        if missing:
            skipped[task] = f"no {' or '.join(missing)} study"
            continue
        for run in studies.values():
            if run.info.run_id not in reports:
                reports[run.info.run_id] = store.read_record(client, run.info.run_id, names.SENSITIVITY_REPORT, SensitivityReport)
        pair = {s: reports[studies[s].info.run_id] for s in SPLITS}
        if pair["train"].num_blocks != pair["validation"].num_blocks:
            skipped[task] = f"train study has {pair['train'].num_blocks} blocks, validation {pair['validation'].num_blocks}"
            continue
        datasets.append(analyse_task(client, task, studies, pair, threshold, n_resamples, seed, level))
    if not datasets:
        raise AnalysisError(
            f"no task of model {model!r} has FINISHED sensitivity studies on both train and validation; "
            + "; ".join(f"{t}: {why}" for t, why in skipped.items())
        )
    datasets.sort(key=lambda d: -(d["spearman_r"] if d["spearman_r"] is not None else -math.inf))
    rs = [d["spearman_r"] for d in datasets if d["spearman_r"] is not None]
    return {
        "model": model,
        "experiment": experiment,
        "tracking_uri": client.tracking_uri,
        "threshold": threshold,
        "n_resamples": n_resamples,
        "seed": seed,
        "ci_level": level,
        "method": (
            "Spearman r over blocks of train vs validation importance; p: scipy.stats.spearmanr; Kendall tau "
            "beside it; interval: bootstrap percentile, resampling each split's examples with replacement "
            "and recomputing both importance vectors"
        ),
        "datasets": {d["dataset"]: d for d in datasets},
        "summary": {
            "n_datasets": len(datasets),
            "n_consistent": sum(d["consistent"] for d in datasets),
            "mean_r": float(np.mean(rs)) if rs else None,
            "n_with_r": len(rs),
        },
        "runs_used": {d["dataset"]: {"train": d["train_run_id"], "validation": d["validation_run_id"]} for d in datasets},
        "skipped": skipped,
    }


def plot_bars(result: dict, path: Path) -> None:
    """correlation_bar_chart.png: r per dataset with its interval and the threshold."""
    ds = [d for d in result["datasets"].values() if d["spearman_r"] is not None]
    fig = Figure(figsize=(max(5, 0.8 * len(ds) + 2), 4))
    ax = fig.subplots()
    r = np.array([d["spearman_r"] for d in ds])
    low = np.array([d["ci_low"] if d["ci_low"] is not None else d["spearman_r"] for d in ds])
    high = np.array([d["ci_high"] if d["ci_high"] is not None else d["spearman_r"] for d in ds])
    ax.bar(
        range(len(ds)),
        r,
        color=["tab:green" if d["consistent"] else "tab:orange" for d in ds],
        yerr=[np.clip(r - low, 0, None), np.clip(high - r, 0, None)],
        capsize=3,
    )
    ax.axhline(result["threshold"], color="k", ls="--", lw=1, label=f"threshold {result['threshold']}")
    ax.set_xticks(range(len(ds)), [d["dataset"] for d in ds], rotation=30, ha="right")
    ax.set_ylabel("Spearman r (train vs validation)")
    ax.set_title(f"{round(100 * result['ci_level'])}% bootstrap CI, {result['n_resamples']} resamples", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_scatter(result: dict, path: Path) -> None:
    """scatter_comparison.png: train vs validation importance per block, one panel per dataset."""
    ds = list(result["datasets"].values())
    cols = min(3, len(ds))
    rows = math.ceil(len(ds) / cols)
    fig = Figure(figsize=(4 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, d in zip(axes.flat, ds):
        x, y = d["importance_train"], d["importance_validation"]
        ax.scatter(x, y, s=14)
        for i, (a, b) in enumerate(zip(x, y)):
            ax.annotate(str(i), (a, b), fontsize=6, alpha=0.7)
        edge = [min(min(x), min(y)), max(max(x), max(y))]
        ax.plot(edge, edge, color="gray", lw=0.8, ls=":")
        r = "n/a" if d["spearman_r"] is None else f"{d['spearman_r']:.3f}{stars(d['p_value'])}"
        ax.set_title(f"{d['dataset']}: r = {r} ({d['n_blocks']} blocks)", fontsize=9)
        ax.set_xlabel("train importance", fontsize=8)
        ax.set_ylabel("validation importance", fontsize=8)
    for ax in list(axes.flat)[len(ds) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_heatmap(result: dict, path: Path) -> None:
    """importance_heatmap.png: dataset x block, per split, each dataset scaled by its largest |importance|."""
    ds = list(result["datasets"].values())
    fig = Figure(figsize=(max(6, 0.35 * ds[0]["n_blocks"] + 3), 1.6 + 1.2 * len(ds)), layout="constrained")
    axes = fig.subplots(2, 1, squeeze=False)
    for ax, split in zip(axes[:, 0], SPLITS):
        scaled = []
        for d in ds:
            scale = max(np.max(np.abs(d["importance_train"])), np.max(np.abs(d["importance_validation"]))) or 1.0
            scaled.append(np.asarray(d[f"importance_{split}"]) / scale)
        image = ax.imshow(np.array(scaled), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_yticks(range(len(ds)), [d["dataset"] for d in ds], fontsize=8)
        ax.set_title(f"{split} importance", fontsize=9)
    axes[-1, 0].set_xlabel("block")
    fig.colorbar(image, ax=axes[:, 0], label="importance / max |importance| of the dataset")
    fig.savefig(path, dpi=120)


def write(result: dict, folder: Path) -> None:
    """Every output file of the analysis into `folder`."""
    (folder / "consistency.json").write_text(json.dumps(result, indent=1))
    (folder / "consistency_table.tex").write_text(latex(result))
    (folder / "consistency_report.txt").write_text(summary_text(result))
    plot_bars(result, folder / "correlation_bar_chart.png")
    plot_scatter(result, folder / "scatter_comparison.png")
    plot_heatmap(result, folder / "importance_heatmap.png")


def main(argv=None) -> None:
    """Run the analysis: `python -m analysis.consistency ...` or `mlflow run . -e consistency`."""
    args = parser().parse_args(argv)
    settings = cli.settings_from(ConsistencySettings, args)
    client = tracking.connect(args.tracking_uri or None)
    result = consistency(
        client, settings.model, settings.experiment, settings.threshold, settings.n_resamples, settings.seed, settings.ci_level
    )
    s = result["summary"]
    params = {
        "model": result["model"],
        "experiment": settings.experiment,
        "threshold": settings.threshold,
        "n_resamples": settings.n_resamples,
        "ci_level": settings.ci_level,
        "seed": settings.seed,
        "datasets": ",".join(result["datasets"]),
    }
    metrics = {
        "n_datasets": s["n_datasets"],
        "n_consistent": s["n_consistent"],
        **({"mean_r": s["mean_r"]} if s["mean_r"] is not None else {}),
    }
    run_id = job.publish(client, names.CONSISTENCY, params, partial(write, result), args.output_dir, metrics)
    print(summary_text(result) + f"analysis run: {run_id}")


if __name__ == "__main__":
    raise SystemExit(job.run_main(main))
