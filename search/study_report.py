"""A Taylor study's report on its MLflow parent run: `search_results.csv`, Optuna's plots, trial counts.

When a worker finds nothing left to do (or on `report_only`), the parent run gets the results table
(one row per trial that got a point, values read back from the trial runs in the store), the plots
(`plots/`), the trial counts and the best trial; the worker prints a summary.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from contract import names, naming, tracking
from contract.trial_table import trial_table
from pruning.tasks import parse_task_list
from search.study_spec import GRAD_COLUMNS, StudySpec
from search.study_storage import storage_label
from search.trial_runner import trial_runs, uses_budget

logger = logging.getLogger(__name__)

PARAM_COLUMNS = ("taylor_seq_len", "taylor_num_samples", "pruning_ratio")
SUMMARY_COLUMNS = (
    "acc_mean",
    "headline_mean",
    "ppl",
    *GRAD_COLUMNS,
    "extreme_pruning_layers",
    "n_params_before",
    "n_params_after",
    "pruning_rate",
)


def results_table(client, study: optuna.Study, setup: dict) -> pd.DataFrame:
    """One row per trial that got a point: the seed's `search_results.csv` columns plus state, success,
    duration (s), MLflow run id and error; values from the trial runs in the store (contract.trial_table)."""
    runs = trial_table(trial_runs(client, setup["parent_run_id"]))[0].set_index("trial_number")
    runs = runs[~runs.index.duplicated(keep="last")]
    base, space = setup["settings"], setup["space"]
    params = [*PARAM_COLUMNS, *(p for p in space if p not in PARAM_COLUMNS)]
    accs = [names.metric("acc", t) for t in parse_task_list(base["tasks"]) if names.metric("acc", t) in runs.columns]
    metrics = [*accs, *SUMMARY_COLUMNS]
    metrics += [o for o in setup["objectives"] if o not in metrics]
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING or not trial.params:
            continue
        run = runs.loc[trial.number] if trial.number in runs.index else None
        rows.append(
            {
                "trial_number": trial.number,
                "state": trial.state.name,
                "success": trial.state == TrialState.COMPLETE and run is not None and run["status"] == "FINISHED",
                **{p: trial.params.get(p, base.get(p)) for p in params},
                **{m: math.nan if run is None else run.get(m, math.nan) for m in metrics},
                "duration": trial.duration.total_seconds() if trial.duration else math.nan,
                "mlflow_run_id": "" if run is None else run["run_id"],
                "error": trial.user_attrs.get("error") or ("" if run is None else run["error"]),
            }
        )
    columns = ["trial_number", "state", "success", *params, *metrics, "duration", "mlflow_run_id", "error"]
    return pd.DataFrame(rows, columns=columns)


def save_plots(study: optuna.Study, setup: dict, folder: Path) -> dict[str, str]:
    """Optuna's history, parameter importances, parallel coordinate and contour plots as PNG files in
    `folder`; returns why each plot that was not made could not be (too few trials, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = [p for p in setup["space"] if len({t.params.get(p) for t in complete}) > 1]
    target = {} if len(setup["objectives"]) == 1 else {"target": lambda t: t.values[0], "target_name": setup["objectives"][0]}
    plots = {  # name: (function, completed trials needed, varying parameters needed, takes params)
        "history": (vis.plot_optimization_history, 1, 0, False),
        "param_importances": (vis.plot_param_importances, 2, 2, True),
        "parallel_coordinate": (vis.plot_parallel_coordinate, 2, 1, True),
        "contour": (vis.plot_contour, 2, 2, True),
    }
    folder.mkdir(parents=True, exist_ok=True)
    skipped = {}
    for name, (plot, min_complete, min_varying, takes_params) in plots.items():
        if len(complete) < min_complete:
            skipped[name] = f"needs {min_complete} completed trials, the study has {len(complete)}"
            continue
        if len(varying) < min_varying:
            skipped[name] = f"needs {min_varying} parameters with different values, the study has {len(varying)}"
            continue
        try:
            with warnings.catch_warnings():  # experimental-API and importance-evaluator notes
                warnings.simplefilter("ignore")
                axes = plot(study, **({"params": varying} if takes_params else {}), **target)
            figure = np.ravel(axes)[0].figure
            figure.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(figure)
        except Exception as err:  # Optuna cannot draw it for this study; the report goes on
            skipped[name] = tracking.error_tag(err)
    return skipped


def write_report(client, study: optuna.Study, setup: dict) -> pd.DataFrame:
    """Log `search_results.csv`, the plots (`plots/`) and trial counts to the parent run; returns the table."""
    parent = setup["parent_run_id"]
    table = results_table(client, study, setup)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / names.STUDY_RESULTS, index=False)
        client.log_artifact(parent, str(Path(tmp) / names.STUDY_RESULTS))
        skipped = save_plots(study, setup, Path(tmp) / "plots")
        client.log_artifacts(parent, str(Path(tmp) / "plots"), "plots")
    for name, reason in skipped.items():
        logger.info(f"plot {name} skipped: {reason}")
    counted = [t for t in study.get_trials(deepcopy=False) if uses_budget(t)]
    metrics = {
        "trials_complete": sum(t.state == TrialState.COMPLETE for t in counted),
        "trials_failed": sum(t.state == TrialState.FAIL for t in counted),
    }
    tags = {"plots_skipped": "; ".join(f"{k}: {v}" for k, v in skipped.items())}
    if len(setup["objectives"]) == 1 and metrics["trials_complete"]:
        best = study.best_trial
        metrics[f"best_{setup['objectives'][0]}"] = best.value
        tags[names.BEST_TRIAL] = str(best.number)
    tracking.log(client, parent, metrics=metrics, tags=tags)
    tracking.describe(client, parent, description(study, table, setup, metrics))
    return table


def description(study: optuna.Study, table: pd.DataFrame, setup: dict, counts: dict, top: int = 5) -> str:
    """The parent run's description: the study's data, trial counts, and its best trials by the first objective."""
    base, objective = setup["settings"], setup["objectives"][0]
    direction = setup["directions"][0]
    done = table[table["success"]].sort_values(objective, ascending=direction == "minimize") if len(table) else table
    params = list(setup["space"])
    lines = [
        f"### Taylor study {study.study_name!r} of {naming.model_label(base['model'])}\n",
        f"Tasks {base['tasks']}, n={base['n_samples'] or 'all'} per task; searched: {', '.join(params)}; "
        f"objective {', '.join(f'{o} ({d})' for o, d in zip(setup['objectives'], setup['directions']))}.\n",
        f"Trials: {counts['trials_complete']} complete, {counts['trials_failed']} failed.\n",
    ]
    if len(done):
        columns = ["trial_number", *params, objective]
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for _, row in done.head(top).iterrows():
            lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summary(spec: StudySpec, study: optuna.Study, table: pd.DataFrame, setup: dict, evaluated: int | None) -> str:
    """What the study holds now, its best trial, and where to look."""
    done = table[table["success"]]
    lines = [
        f"study {spec.name!r} ({spec.sampler}): {len(done)} trials complete, "
        f"{int((table['state'] == 'FAIL').sum())} failed or redone"
        + (f"; this worker evaluated {evaluated}" if evaluated is not None else "")
    ]
    if len(spec.objectives) == 1 and len(done):
        best = study.best_trial
        lines.append(
            f"best {spec.objectives[0]} {best.value:.4g}: trial {best.number}, "
            + ", ".join(f"{k}={v}" for k, v in best.params.items())
        )
    lines.append(f"parent run: {setup['parent_run_id']} (artifacts {names.STUDY_RESULTS}, plots/)")
    lines.append(f"see it: {dashboard_hint(storage_label(spec.storage))}   |   {tracking.ui_hint(setup['tracking_uri'])}")
    return "\n".join(lines)


def dashboard_hint(storage: str) -> str:
    """How to open the study in optuna-dashboard: the command when it is installed, else how to install it."""
    import shutil

    if shutil.which("optuna-dashboard"):
        return f"optuna-dashboard {storage}"
    return f"pip install optuna-dashboard, then optuna-dashboard {storage}"
