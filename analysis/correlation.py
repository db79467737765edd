"""Which pruning parameters and gradient statistics go with accuracy, from a study's trial runs.

    python -m analysis.correlation --study_name S | --experiment E [--target acc_mean] [--max_predictors 2]

Reads the trial runs (`prunetrack.kind=prune`) of an Optuna study (tag `optuna.study_name`) or of
an experiment, tabulates the successful ones (FINISHED, target logged) as search_results.csv, and
correlates every predictor (the numeric pruning parameters that vary, the gradient statistics
`grad_*`, `extreme_pruning_layers`, `pruning_rate`) with the target: Spearman and Pearson with
p-values, Benjamini-Hochberg q-values, stars and sample counts. A linear model on the strongest
predictors is reported with its in-sample fit and its leave-one-out cross-validated error; only the
latter estimates prediction.
"""

from __future__ import annotations

from analysis.settings import CorrelationSettings
from analysis.settings import correlation_parser as parser
from contract import cli

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load MLflow
    cli.check_args(parser)

import json
import math
import re
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.api as sm
from matplotlib.figure import Figure  # no pyplot: no backend or global figure state
from scipy import stats
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.model_selection import LeaveOneOut, cross_val_predict

from analysis import job, store
from analysis.report import STARS_LEGEND, fmt_p, stars
from analysis.store import AnalysisError
from contract import names, tracking
from contract.trial_table import trial_table

TARGET = re.compile(r"acc_.+|ppl|headline_mean")  # acc_mean, acc_<task>, acc_norm_<task>, ppl, headline_mean
# evaluation settings and bookkeeping (the study job also logs study_name and trial_number), not predictors
SETTINGS = {"seed", "batch_size", "n_samples", "num_blocks", "baseline", "save_model", "study_name", "trial_number"}
STRUCTURE = ("extreme_pruning_layers", "pruning_rate")
COLLINEAR = 0.95  # a model predictor is skipped when |Pearson r| with one already chosen exceeds this
MIN_TRIALS, PER_PREDICTOR = 10, 5


def trial_runs(client, study_name: str = "", experiment: str = "") -> tuple[str, list]:
    """A label for the study and its trial runs (any status), newest first."""
    if not study_name and not experiment:
        raise AnalysisError(f"give study_name or experiment; studies in the store: {', '.join(_studies(client)) or 'none'}")
    found = store.runs(client, names.PRUNE, experiment, status=None)
    if study_name:
        found = [r for r in found if r.data.tags.get(names.STUDY_NAME) == study_name]
    if not found:
        what = f"study {study_name!r}" if study_name else f"experiment {experiment!r}"
        raise AnalysisError(
            f"no trial runs (prunetrack.kind=prune) of {what} in {client.tracking_uri}; "
            f"studies in the store: {', '.join(_studies(client)) or 'none'}"
        )
    study_names = sorted({r.data.tags.get(names.STUDY_NAME, "") for r in found})
    if len(study_names) > 1:
        studies = ", ".join(n or "(none)" for n in study_names)
        raise AnalysisError(f"experiment {experiment!r} holds trials of several studies ({studies}); choose one with study_name")
    return study_name or study_names[0] or f"experiment {experiment}", found


def _studies(client) -> list[str]:
    return sorted({r.data.tags.get(names.STUDY_NAME, "") for r in store.runs(client, names.STUDY, status=None)} - {""})


def check_target(table: pd.DataFrame, target: str) -> None:
    """Reject a target that is not an accuracy or perplexity metric of these trials."""
    allowed = sorted(c for c in table.columns if TARGET.fullmatch(c))
    if target not in allowed:
        raise AnalysisError(f"unknown target {target!r}; allowed for these trials: {', '.join(allowed) or 'none logged'}")


def predictors(table: pd.DataFrame, params: set[str], target: str) -> tuple[list[str], dict[str, str]]:
    """The predictor columns to test, and the candidates not tested with the reason."""
    candidates = [c for c in table.columns if (c in params and c not in SETTINGS) or c.startswith("grad_") or c in STRUCTURE]
    tested, untested = [], {}
    for name in (c for c in candidates if c != target):
        column = pd.to_numeric(table[name], errors="coerce")
        if (column.isna() & table[name].notna()).any():
            if table[name].nunique() > 1:
                untested[name] = "not numeric"
        elif column.nunique() < 2:
            untested[name] = "constant in these trials"
        elif column.notna().sum() < 3:
            untested[name] = "fewer than 3 trials logged it"
        else:
            tested.append(name)
    return tested, untested


def correlations(table: pd.DataFrame, columns: list[str], target: str) -> list[dict]:
    """Spearman and Pearson of each predictor with the target, sorted by |Spearman r|."""
    out = []
    for name in columns:
        pair = table[[name, target]].apply(pd.to_numeric, errors="coerce").dropna()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho, rho_p = stats.spearmanr(pair[name], pair[target])
            r, r_p = stats.pearsonr(pair[name], pair[target])
        out.append(
            {
                "predictor": name,
                "n": len(pair),
                "spearman_r": float(rho),
                "spearman_p": float(rho_p),
                "pearson_r": float(r),
                "pearson_p": float(r_p),
            }
        )
    ok = [c for c in out if math.isfinite(c["spearman_p"])]
    if ok:
        for c, q in zip(ok, stats.false_discovery_control([c["spearman_p"] for c in ok], method="bh")):
            c["q_value"] = float(q)
    for c in out:
        c.setdefault("q_value", None)
        c["stars"] = stars(c["spearman_p"])
    return sorted(out, key=lambda c: -abs(c["spearman_r"]) if math.isfinite(c["spearman_r"]) else math.inf)


def _r2(y: np.ndarray, predicted: np.ndarray) -> float:
    """R2 of `predicted` against `y`; NaN (reported as null) when `y` is constant."""
    return float(r2_score(y, predicted, force_finite=False)) if np.ptp(y) > 0 else math.nan


def prediction_model(table: pd.DataFrame, ranked: list[dict], target: str, max_predictors: int = 2) -> dict:
    """Ordinary least squares of the target on the strongest predictors (greedy by |Spearman r|,
    skipping near-duplicates, at most one per 5 trials): in-sample R2/MAE and leave-one-out R2/MAE."""
    usable = [c for c in ranked if math.isfinite(c["spearman_r"])]
    data = table[[c["predictor"] for c in usable] + [target]].apply(pd.to_numeric, errors="coerce")
    n_all = int(data[target].notna().sum())
    limit = max(1, min(max_predictors, n_all // PER_PREDICTOR))
    chosen = _predictors(data, usable, limit)
    rows = data[[*chosen, target]].dropna()
    n, k = len(rows), len(chosen)
    model = {
        "target": target,
        "predictors": chosen,
        "n": n,
        "method": "ordinary least squares with intercept",
        "selection": (
            f"greedy by |Spearman r|, at most {max_predictors} and one per {PER_PREDICTOR} trials, skipping a "
            f"predictor whose |Pearson r| with one already chosen exceeds {COLLINEAR}"
        ),
        "note": (
            "r2 and mae are in-sample: the fit on the n trials the model was estimated from, not a prediction. "
            "loo_r2 and loo_mae are leave-one-out cross-validated: each trial predicted by the model fitted "
            "without it; they estimate how well the formula predicts an unseen trial."
        ),
        "warnings": [],
    }
    if not chosen or n < k + 3:
        model["warnings"].append(
            f"{n} trials, {k} usable predictors: no model fitted (needs a predictor with a defined "
            f"correlation and at least {k + 3} trials)"
        )
        return {**model, "formula": None, "coefficients": None, "r2": None, "mae": None, "loo_r2": None, "loo_mae": None}
    model.update(_fit(rows[chosen].to_numpy(float), rows[target].to_numpy(float), chosen, target))
    if n < MIN_TRIALS:
        model["warnings"].append(f"only {n} trials (fewer than {MIN_TRIALS}): correlations and the model are unreliable")
    if n < PER_PREDICTOR * max(k, 1) or limit < max_predictors:
        model["warnings"].append(
            f"{n} trials allow about {max(1, n // PER_PREDICTOR)} predictor(s) at {PER_PREDICTOR} "
            f"trials each; asked for up to {max_predictors}"
        )
    if model["loo_r2"] is not None and model["loo_r2"] < 0:
        model["warnings"].append("leave-one-out R2 < 0: the formula predicts unseen trials worse than their mean does")
    return model


def _predictors(data: pd.DataFrame, usable: list[dict], limit: int) -> list[str]:
    """Up to `limit` predictors, greedy in the order of `usable`, skipping a near-duplicate of one already chosen."""
    chosen = []
    for c in usable:
        pair = data[[*chosen, c["predictor"]]].dropna()
        if all(abs(np.corrcoef(pair[c["predictor"]], pair[o])[0, 1]) <= COLLINEAR for o in chosen):
            chosen.append(c["predictor"])
        if len(chosen) == limit:
            break
    return chosen


def _fit(x: np.ndarray, y: np.ndarray, chosen: list[str], target: str) -> dict:
    """The OLS fit of `y` on `x` (with intercept): formula, coefficients, in-sample and leave-one-out R2/MAE."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a perfect fit: zero standard errors, p-values 0 or undefined (null)
        fit = sm.OLS(y, sm.add_constant(x, has_constant="add")).fit()
        beta, std_err, p_values, fitted = fit.params, fit.bse, fit.pvalues, fit.fittedvalues
    # each trial predicted by the same model (OLS with intercept) fitted on the other n - 1
    loo = cross_val_predict(LinearRegression(), x, y, cv=LeaveOneOut())
    r2 = _r2(y, fitted)
    f_p = float(fit.f_pvalue) if math.isfinite(r2) and r2 < 1 else None
    terms = "".join(f" {'-' if b < 0 else '+'} {abs(b):.4g} × {name}" for b, name in zip(beta[1:], chosen))
    coefficient_names = ["intercept", *chosen]
    return dict(
        formula=f"{target} ≈ {beta[0]:.4g}{terms}",
        coefficients=dict(zip(coefficient_names, map(float, beta))),
        std_errors=dict(zip(coefficient_names, map(float, std_err))),
        p_values={m: _clean(p) for m, p in zip(coefficient_names, p_values)},
        r2=_clean(r2),
        mae=float(mean_absolute_error(y, fitted)),
        f_p_value=_clean(f_p),
        loo_r2=_clean(_r2(y, loo)),
        loo_mae=float(mean_absolute_error(y, loo)),
    )


def _clean(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def report_text(result: dict) -> str:
    """correlation_report.txt of an analysis result (`analyse`)."""
    label, table, excluded, target = result["label"], result["table"], result["excluded"], result["target"]
    ranked, untested, model = result["ranked"], result["untested"], result["model"]
    n = len(table)
    lines = [
        f"Correlation of trial results with {target}: {label}",
        f"trials used: {n} successful (FINISHED with {target} logged); excluded: "
        + (", ".join(f"{v} {k}" for k, v in excluded.items()) or "none"),
        "",
    ]
    if n < MIN_TRIALS:
        lines += [f"WARNING: only {n} trials (fewer than {MIN_TRIALS}); treat every correlation below as tentative.", ""]
    lines += [
        f"Spearman and Pearson correlation with {target}, sorted by |Spearman r|; {STARS_LEGEND} (Spearman p, "
        f"unadjusted); q: Benjamini-Hochberg over the {len(ranked)} predictors tested",
        "",
        f"{'predictor':<26}{'n':>4}{'spearman_r':>12}     {'p':<10}{'q':<10}{'pearson_r':>10}  {'p':<10}",
    ]
    for c in ranked:
        lines.append(
            f"{c['predictor']:<26}{c['n']:>4}{c['spearman_r']:>+12.4f} {c['stars']:<3} {fmt_p(c['spearman_p']):<10}"
            f"{fmt_p(c['q_value']):<10}{c['pearson_r']:>+10.4f}  {fmt_p(c['pearson_p']):<10}"
        )
    lines += [f"{name}: not tested ({why})" for name, why in untested.items()]
    best = table.loc[table[target].idxmin() if target == "ppl" else table[target].idxmax()]
    shown = ", ".join(f"{c['predictor']}={best[c['predictor']]:.4g}" for c in ranked if pd.notna(best[c["predictor"]]))
    lines += [
        "",
        f"best trial: #{best['trial_number']} (run {best['run_id']}): {target} {best[target]:.4g}; {shown}",
        "",
        f"Linear model ({model['method']}, n = {model['n']} trials; {model['selection']})",
    ]
    if model["formula"]:
        lines += [
            f"  {model['formula']}",
            f"  in-sample fit (not a prediction): R2 = {_fmt(model['r2'])}, MAE = {model['mae']:.4g}, "
            f"F-test p = {fmt_p(model['f_p_value'])}",
            f"  leave-one-out cross-validation (prediction of unseen trials): R2 = {_fmt(model['loo_r2'])}, "
            f"MAE = {model['loo_mae']:.4g}",
        ]
        lines += [
            f"  {name:<24} {model['coefficients'][name]:+.4g}  (std err {model['std_errors'][name]:.3g}, "
            f"p {fmt_p(model['p_values'][name])})"
            for name in model["coefficients"]
        ]
    lines += [f"WARNING: {w}" for w in model["warnings"]]
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def plot_heatmap(table: pd.DataFrame, columns: list[str], path: Path) -> None:
    """correlation_heatmap.png: Spearman r between the target, the predictors and ppl."""
    matrix = table[columns].apply(pd.to_numeric, errors="coerce").corr(method="spearman")
    size = max(5, 0.6 * len(columns) + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(matrix.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(columns)), columns, fontsize=8)
    for (i, j), v in np.ndenumerate(matrix.to_numpy()):
        ax.text(j, i, f"{v:.2f}" if math.isfinite(v) else "", ha="center", va="center", fontsize=7)
    ax.set_title(f"Spearman r, n = {len(table)} trials", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_scatter(table: pd.DataFrame, ranked: list[dict], target: str, path: Path) -> None:
    """scatter_matrix.png: the target against each predictor, with a trend line, r, stars and n."""
    cols = min(4, max(1, len(ranked)))
    rows = max(1, math.ceil(len(ranked) / cols))
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, c in zip(axes.flat, ranked):
        pair = table[[c["predictor"], target]].apply(pd.to_numeric, errors="coerce").dropna()
        x, y = pair[c["predictor"]].to_numpy(), pair[target].to_numpy()
        ax.scatter(x, y, s=16)
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 2)
        ax.plot(grid, slope * grid + intercept, color="tab:red", lw=1)
        ax.set_title(f"Spearman r = {c['spearman_r']:+.3f}{c['stars']} (n = {c['n']})", fontsize=8)
        ax.set_xlabel(c["predictor"], fontsize=8)
        ax.set_ylabel(target, fontsize=8)
    for ax in list(axes.flat)[len(ranked) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def analyse(client, study_name: str = "", experiment: str = "", target: str = "acc_mean", max_predictors: int = 2) -> dict:
    """The results table and everything the analysis reports."""
    if max_predictors < 1:
        raise AnalysisError(f"max_predictors {max_predictors} out of range; allowed: >= 1")
    label, runs = trial_runs(client, study_name, experiment)
    table, params = trial_table(runs)
    check_target(table, target)
    finished = table["status"] == "FINISHED"
    ok = finished & pd.to_numeric(table[target], errors="coerce").notna()
    excluded = {k: int(v) for k, v in table.loc[~finished, "status"].value_counts().items()}
    if (finished & ~ok).any():
        excluded[f"FINISHED without {target}"] = int((finished & ~ok).sum())
    table = table[ok].drop(columns=["status", "error"]).assign(success=True).reset_index(drop=True)
    if len(table) < 3:
        raise AnalysisError(f"{label}: only {len(table)} successful trial(s) with {target}; correlations need at least 3")
    columns, untested = predictors(table, params, target)
    if not columns:
        raise AnalysisError(
            f"{label}: no predictor varies across the {len(table)} successful trials; "
            + "; ".join(f"{k}: {v}" for k, v in untested.items())
        )
    ranked = correlations(table, columns, target)
    model = prediction_model(table, ranked, target, max_predictors)
    return {
        "label": label,
        "table": table,
        "excluded": excluded,
        "ranked": ranked,
        "untested": untested,
        "model": model,
        "target": target,
    }


def write(result: dict, folder: Path) -> None:
    """Every output file of the analysis into `folder`."""
    table, target, ranked = result["table"], result["target"], result["ranked"]
    first = ["trial_number", "run_id", "success"]
    table[first + [c for c in table.columns if c not in first]].to_csv(folder / names.STUDY_RESULTS, index=False)
    (folder / "correlation_report.txt").write_text(report_text(result))
    (folder / "prediction_model.json").write_text(json.dumps(result["model"], indent=1, ensure_ascii=False))
    (folder / "correlations.json").write_text(
        json.dumps(
            {
                "study": result["label"],
                "target": target,
                "n_trials": len(table),
                "excluded": result["excluded"],
                "correlations": ranked,
                "not_tested": result["untested"],
            },
            indent=1,
        )
    )
    extra = ["ppl"] if "ppl" in table and target != "ppl" else []
    plot_heatmap(table, [target, *[c["predictor"] for c in ranked], *extra], folder / "correlation_heatmap.png")
    plot_scatter(table, ranked, target, folder / "scatter_matrix.png")


def main(argv=None) -> None:
    """Run the analysis: `python -m analysis.correlation ...` or `mlflow run . -e correlation`."""
    args = parser().parse_args(argv)
    settings = cli.settings_from(CorrelationSettings, args)
    client = tracking.connect(args.tracking_uri or None)
    result = analyse(client, settings.study_name, settings.experiment, settings.target, settings.max_predictors)
    model = result["model"]
    metrics = {"n_trials": len(result["table"]), **{k: model[k] for k in ("r2", "loo_r2") if model[k] is not None}}
    params = {
        "study_name": settings.study_name,
        "experiment": settings.experiment,
        "target": settings.target,
        "max_predictors": settings.max_predictors,
    }
    run_id = job.publish(client, names.CORRELATION, params, partial(write, result), args.output_dir, metrics)
    print(report_text(result) + f"analysis run: {run_id}")


if __name__ == "__main__":
    raise SystemExit(job.run_main(main))
