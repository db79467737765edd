"""Analysis jobs against a real `mlflow server` (SQLite store, artifacts proxied to a moto S3 server).

Studies are logged through the MLflow client exactly as the search jobs log them (synthetic values
with a known answer), or by running `python -m search.sensitivity` on a tiny random model; the
analyses run in other processes and their numbers are checked against scipy/numpy computed here.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from boto3.s3.transfer import TransferConfig
from mlflow.projects._project_spec import load_project
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from scipy import stats
from servers import free_port, mlflow_server, server_process

from analysis import beam_summary, consistency, correlation, export, job
from contract import names, tracking
from contract.names import KIND
from contract.records import BeamResults, Recommendation

ROOT = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI-do-not-log-7c1e"
ACCESS = "AKIAEXPORTTESTKEY42"
# Runs `python -m <module> <args>` and then says which model-side modules the process imported: torch,
# transformers, or any of pruning/ but its torch-free parts: the unit type (pruning.units) that contract.records
# uses and the definition of a drop (pruning.drop) that the consistency report bootstraps.
RUN_MODULE = (
    "import runpy, sys\nname = sys.argv.pop(1)\ntry:\n    runpy.run_module(name, run_name='__main__', alter_sys=True)\n"
    "finally:\n    print('model side imported:',\n"
    "          sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}\n"
    "                 | {m for m in sys.modules if m.startswith('pruning.') and m not in ('pruning.units', 'pruning.drop')}))"
)
# Train and validation effects of removing each of 8 blocks, per synthetic task.
MC_DROPS = [0.40, 0.0, 0.06, 0.12, 0.18, 0.24, 0.30, 0.36]
PPL_TRAIN = list(np.linspace(0.0, 0.7, 8))
PPL_VALIDATION = [0.5, 0.1, 0.7, 0.0, 0.3, 0.6, 0.2, 0.4]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """URL of an mlflow server on loopback (SQLite store, artifacts proxied to a local folder)."""
    folder = tmp_path_factory.mktemp("store")
    with mlflow_server(f"sqlite:///{folder}/mlflow.db", str(folder / "mlartifacts")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return MlflowClient(server)


def analyse(server, module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m analysis.<module> ...` in another process against the server; it must succeed
    without importing the model side (DESIGN.md: analysis never loads a model)."""
    out = subprocess.run(
        [sys.executable, "-c", RUN_MODULE, f"analysis.{module}", "--tracking_uri", server, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model side imported: []" in out.stdout, out.stdout[-500:]
    return out


def analyse_here(main, server, *args: str) -> str:
    """An analysis's main() in this process; its stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(["--tracking_uri", server, *args])
    return buffer.getvalue()


def head_commit() -> str | None:
    """The commit checked out in this checkout, as git says it (None outside a git checkout)."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def analysis_run_id(stdout: str) -> str:
    return re.search(r"analysis run: (\w+)", stdout).group(1)


def one_line_error(capsys, main, argv) -> str:
    """The single stderr line of a job that must fail with a user error."""
    assert job.run_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# --------------------------------------------------------------------------- synthetic studies


def mc_results(rng, n: int, drops: list[float], base: float = 0.85) -> list[dict]:
    """Per-example multiple-choice results of the baseline and each block's removal; odd
    configurations list their examples in reverse order (the analysis must align on doc ids)."""
    out = []
    for c, d in enumerate([0.0, *drops]):
        acc = (rng.random(n) < base - d).astype(int).tolist()
        ids = list(range(100, 100 + n))
        if c % 2:
            ids, acc = ids[::-1], acc[::-1]
        out.append(
            {
                "task": "mc_stable",
                "kind": "multiple_choice",
                "doc_id": ids,
                "acc": acc,
                "acc_norm": acc,
                "loglikelihoods": [[-1.0, -2.0]] * n,
            }
        )
    return out


def ppl_results(rng, n: int, effects: list[float]) -> list[dict]:
    tokens = rng.integers(50, 200, n)
    return [
        {
            "task": "ppl_shuffled",
            "kind": "perplexity",
            "doc_id": list(range(n)),
            "nll": (tokens * (2.5 + e + rng.normal(0, 0.3, n))).tolist(),
            "tokens": tokens.tolist(),
            "words": (tokens // 2).tolist(),
            "bytes": (tokens * 4).tolist(),
        }
        for e in [0.0, *effects]
    ]


def true_importance(results: list[dict]) -> list[float]:
    """Importance as docs/scoring.md defines it, straight from the per-example results."""
    if "nll" in results[0]:
        log_ppl = [np.log(np.exp(sum(r["nll"]) / sum(r["tokens"]))) for r in results]
        return [v - log_ppl[0] for v in log_ppl[1:]]
    acc = [np.mean(r["acc"]) for r in results]
    return [acc[0] - a for a in acc[1:]]


def log_sensitivity(client, exp_id: str, model: str, split: str, per_task: dict, status: str = "FINISHED") -> str:
    """A sensitivity study as search.sensitivity logs it: parent run (params, importance series,
    sensitivity.json) and one configuration run per removal with per_example/<task>.json. With
    `per_task` values of None, only the parent's params and metrics are logged."""
    parent = client.create_run(exp_id, tags={KIND: "sensitivity"}).info.run_id
    num_blocks = 8
    tracking.log(
        client,
        parent,
        params={"model": model, "tasks": ",".join(per_task), "split": split, "n_samples": 0, "seed": 0, "num_blocks": num_blocks},
    )
    importance = {t: (true_importance(r) if r else list(np.linspace(1, 0, num_blocks))) for t, r in per_task.items()}
    for task, values in importance.items():
        tracking.log_series(client, parent, f"importance/{task}", values)
    tracking.log_series(client, parent, "importance", np.mean(list(importance.values()), axis=0))
    if all(per_task.values()):
        children = {}
        for c in range(num_blocks + 1):
            removed = str(c - 1) if c else ""
            child = client.create_run(
                exp_id,
                tags={KIND: "config", "removed_blocks": removed, "num_removed": str(int(c > 0)), MLFLOW_PARENT_RUN_ID: parent},
            ).info.run_id
            for task, results in per_task.items():
                tracking.log_json(client, child, f"{task}.json", results[c], "per_example")
            client.set_terminated(child, "FINISHED")
            children[removed or "baseline"] = child
        tracking.log_json(
            client,
            parent,
            "sensitivity.json",
            {
                "baseline": {},
                "num_blocks": num_blocks,
                "importance": importance,
                "metrics": {},
                "child_runs": children,
                "importance_mean": np.mean(list(importance.values()), axis=0).tolist(),
                "counts": {"evaluated": 9, "reused": 0},
            },
        )
    client.set_terminated(parent, status)
    return parent


@pytest.fixture(scope="module")
def sensitivity_store(client):
    """Train and validation studies of model `synth_model` (plus an older and a FAILED one that must
    not be used); returns the per-example results and the ids of the studies that must be used."""
    rng = np.random.default_rng(1)
    exp_id = tracking.experiment_id(client, "sensitivity/synth_model")
    log_sensitivity(client, exp_id, "synth_model", "train", {"mc_stable": None, "ppl_shuffled": None})  # older
    data = {
        "train": {"mc_stable": mc_results(rng, 400, MC_DROPS), "ppl_shuffled": ppl_results(rng, 100, PPL_TRAIN)},
        "validation": {"mc_stable": mc_results(rng, 300, MC_DROPS), "ppl_shuffled": ppl_results(rng, 80, PPL_VALIDATION)},
    }
    used = {split: log_sensitivity(client, exp_id, "synth_model", split, data[split]) for split in data}
    log_sensitivity(client, exp_id, "synth_model", "train", {"mc_stable": None, "ppl_shuffled": None}, "FAILED")  # newer
    return data, used


@pytest.fixture(scope="module")
def consistency_run(server, client, sensitivity_store, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("consistency")
    out = analyse(server, "consistency", "--model", "synth_model", "--n_resamples", "1000", "--output_dir", str(out_dir))
    return analysis_run_id(out.stdout), out_dir, out.stdout


@pytest.mark.service
def test_consistency_matches_scipy_and_uses_the_latest_finished_studies(client, sensitivity_store, consistency_run):
    data, used = sensitivity_store
    run_id, out_dir, stdout = consistency_run
    result = json.loads((out_dir / "consistency.json").read_text())
    assert set(result["datasets"]) == {"mc_stable", "ppl_shuffled"}
    for task, d in result["datasets"].items():
        assert (d["train_run_id"], d["validation_run_id"]) == (used["train"], used["validation"])
        train, validation = true_importance(data["train"][task]), true_importance(data["validation"][task])
        assert d["importance_train"] == pytest.approx(train, abs=1e-12)
        r, p = stats.spearmanr(train, validation)
        tau, tau_p = stats.kendalltau(train, validation)
        assert (d["spearman_r"], d["p_value"]) == pytest.approx((r, p), rel=1e-9)
        assert (d["kendall_tau"], d["kendall_p_value"]) == pytest.approx((tau, tau_p), rel=1e-9)
        assert d["consistent"] == (r >= 0.9) and d["n_blocks"] == 8 and d["n_resamples"] == 1000
        assert d["n_examples_train"] == len(data["train"][task][0]["doc_id"])
    stable, shuffled = result["datasets"]["mc_stable"], result["datasets"]["ppl_shuffled"]
    assert stable["consistent"] and not shuffled["consistent"]
    assert result["summary"] == {
        "n_datasets": 2,
        "n_consistent": 1,
        "n_with_r": 2,
        "mean_r": pytest.approx((stable["spearman_r"] + shuffled["spearman_r"]) / 2),
    }
    # The run holds the same files, tagged as a consistency analysis.
    run = client.get_run(run_id)
    assert run.data.tags[KIND] == "consistency" and run.info.status == "FINISHED"
    assert (
        {a.path for a in client.list_artifacts(run_id)}
        == {p.name for p in out_dir.iterdir()}
        >= {
            "consistency.json",
            "consistency_table.tex",
            "correlation_bar_chart.png",
            "scatter_comparison.png",
            "importance_heatmap.png",
        }
    )
    tex = (out_dir / "consistency_table.tex").read_text()
    assert r"\toprule" in tex and r"mc\_stable" in tex and "mc_stable" not in tex
    assert used["train"] in stdout and "1/2 datasets" in stdout


@pytest.mark.service
def test_bootstrap_interval_agrees_with_an_independent_bootstrap(sensitivity_store, consistency_run):
    """The job's interval against a plain loop here: other seed, examples drawn with rng.integers."""
    data, _ = sensitivity_store
    result = json.loads((consistency_run[1] / "consistency.json").read_text())
    rng = np.random.default_rng(12345)

    def resample(results):
        n = len(results[0]["doc_id"])
        idx = rng.integers(0, n, n)
        order = [np.argsort(r["doc_id"]) for r in results]  # align every configuration on doc id
        return true_importance(
            [{k: list(np.asarray(r[k])[o][idx]) for k in ("acc", "nll", "tokens") if k in r} for r, o in zip(results, order)]
        )

    for task, d in result["datasets"].items():
        rs = [stats.spearmanr(resample(data["train"][task]), resample(data["validation"][task]))[0] for _ in range(600)]
        low, high = np.nanpercentile(rs, [2.5, 97.5])
        assert d["ci_low"] == pytest.approx(low, abs=0.06) and d["ci_high"] == pytest.approx(high, abs=0.06), task
    assert result["datasets"]["mc_stable"]["ci_low"] > 0.8
    assert result["datasets"]["ppl_shuffled"]["ci_high"] < 0.9  # confidently below the threshold


@pytest.mark.service
def test_consistency_bad_input_is_one_line(server, sensitivity_store, capsys):
    err = one_line_error(capsys, consistency.main, ["--tracking_uri", server, "--model", "no/such-model"])
    assert "no FINISHED sensitivity study of model 'no/such-model'" in err
    err = one_line_error(capsys, consistency.main, ["--tracking_uri", server, "--experiment", "nope"])
    assert err.startswith("error: unknown experiment 'nope'")


# --------------------------------------------------------------------------- correlation


def log_study(client, name: str, n_ok: int, rng, n_failed: int = 0, n_running: int = 0) -> dict:
    """An Optuna study of `prune` trials as the study job logs it; returns the logged values of
    the successful trials, column by column."""
    from search.prune import PruneSettings

    exp_id = tracking.experiment_id(client, f"study/{name}")
    parent = client.create_run(exp_id, tags={KIND: "study", names.STUDY_NAME: name}).info.run_id
    logged: dict[str, list] = {}
    for t in range(n_ok + n_failed + n_running):
        seq, samples = [16, 32, 64, 128, 256][t % 5], [128, 256, 512][t % 3]
        run = client.create_run(
            exp_id, tags={KIND: "prune", names.STUDY_NAME: name, names.TRIAL_NUMBER: str(t), MLFLOW_PARENT_RUN_ID: parent}
        ).info.run_id
        tracking.log(
            client,
            run,
            params={
                **asdict(PruneSettings()),
                "taylor_seq_len": seq,
                "taylor_num_samples": samples,
                "study_name": name,
                "trial_number": t,
            },
        )
        if t >= n_ok:
            if t < n_ok + n_failed:
                tracking.fail(client, run, "CUDA out of memory")
            continue
        grad = 3 + 0.04 * seq + rng.normal(0, 1.5)
        acc = {"acc_boolq": 0.70 - 0.004 * grad + rng.normal(0, 0.004), "acc_piqa": 0.66 - 0.003 * grad + rng.normal(0, 0.004)}
        metrics = {
            **acc,
            "acc_mean": float(np.mean(list(acc.values()))),
            "acc_norm_piqa": acc["acc_piqa"] + 0.01,
            "ppl": 20 + grad + rng.normal(0, 1),
            "grad_norm_ratio": grad,
            "grad_mean_ratio": 0.5 * grad + rng.normal(0, 1),
            "grad_std_ratio": rng.normal(5, 1),
            "grad_max_ratio": grad**1.5,
            "grad_mean_range": rng.normal(1, 0.1),
            "grad_norm_range": rng.normal(2, 0.1),
            "extreme_pruning_layers": float(grad > 8),
            "pruning_rate": 0.2,
            "n_params_before": 1000.0,
            "n_params_after": 800.0,
            "baseline_acc_mean": 0.8,
            "eval_seconds": rng.random(),
        }
        tracking.log(client, run, metrics=metrics)
        tracking.log_series(client, run, "layer_grad_norm", rng.random(4))
        client.set_terminated(run, "FINISHED")
        for k, v in {"taylor_seq_len": seq, "taylor_num_samples": samples, **metrics}.items():
            logged.setdefault(k, []).append(v)
    client.set_terminated(parent, "FINISHED")
    return logged


@pytest.fixture(scope="module")
def studies(client):
    rng = np.random.default_rng(7)
    return {
        "taylor-a": log_study(client, "taylor-a", 16, rng, n_failed=2, n_running=1),
        "taylor-b": log_study(client, "taylor-b", 6, rng),
    }


@pytest.fixture(scope="module")
def correlation_run(server, studies, tmp_path_factory):
    """The MLproject `correlation` command, as `mlflow run . -e correlation` runs it, in another process."""
    out_dir = tmp_path_factory.mktemp("correlation")
    command = (
        load_project(ROOT)
        .get_entry_point("correlation")
        .compute_command({"study_name": "taylor-a", "output_dir": str(out_dir)}, str(out_dir))
    )
    assert command.startswith("python -m analysis.correlation ")
    out = subprocess.run(
        command.replace("python -m ", f'{sys.executable} -c "$RUN_MODULE" ', 1),
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": server, "RUN_MODULE": RUN_MODULE},
    )
    assert out.returncode == 0 and "model side imported: []" in out.stdout, out.stderr[-3000:]
    return analysis_run_id(out.stdout), out_dir


def ols_in_sample_and_loo(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    design = np.column_stack([np.ones(len(y)), x])
    fit = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    loo = np.array([design[i] @ np.linalg.lstsq(np.delete(design, i, 0), np.delete(y, i), rcond=None)[0] for i in range(len(y))])
    ss = ((y - y.mean()) ** 2).sum()
    return 1 - ((y - fit) ** 2).sum() / ss, np.abs(y - fit).mean(), 1 - ((y - loo) ** 2).sum() / ss, np.abs(y - loo).mean()


@pytest.mark.service
def test_correlation_matches_scipy_on_successful_trials(client, studies, correlation_run):
    run_id, out_dir = correlation_run
    values = studies["taylor-a"]
    y = np.array(values["acc_mean"])
    found = json.loads((out_dir / "correlations.json").read_text())
    assert found["n_trials"] == 16 and found["excluded"] == {"FAILED": 2, "RUNNING": 1}
    tested = {c["predictor"]: c for c in found["correlations"]}
    assert set(tested) == {
        "taylor_seq_len",
        "taylor_num_samples",
        "grad_norm_ratio",
        "grad_mean_ratio",
        "grad_std_ratio",
        "grad_max_ratio",
        "grad_mean_range",
        "grad_norm_range",
        "extreme_pruning_layers",
    }
    assert found["not_tested"]["pruning_rate"] == "constant in these trials"
    for name, c in tested.items():
        rho, rho_p = stats.spearmanr(values[name], y)
        r, r_p = stats.pearsonr(values[name], y)
        assert (c["spearman_r"], c["spearman_p"], c["pearson_r"], c["pearson_p"]) == pytest.approx((rho, rho_p, r, r_p), rel=1e-9)
        assert c["n"] == 16 and c["stars"] == ("***" if rho_p < 0.001 else "**" if rho_p < 0.01 else "*" if rho_p < 0.05 else "")
    ranked = [abs(c["spearman_r"]) for c in found["correlations"]]
    assert ranked == sorted(ranked, reverse=True)
    assert found["correlations"][0]["predictor"] in ("grad_norm_ratio", "grad_max_ratio")  # the designed signal
    assert tested["grad_norm_ratio"]["spearman_r"] < -0.8 and tested["grad_norm_ratio"]["stars"] == "***"

    model = json.loads((out_dir / "prediction_model.json").read_text())
    assert model["n"] == 16 and model["predictors"][0] == found["correlations"][0]["predictor"]
    x = np.column_stack([values[p] for p in model["predictors"]])
    r2, mae, loo_r2, loo_mae = ols_in_sample_and_loo(x, y)
    assert (model["r2"], model["mae"], model["loo_r2"], model["loo_mae"]) == pytest.approx((r2, mae, loo_r2, loo_mae), rel=1e-6)
    assert model["loo_r2"] < model["r2"] and model["formula"].startswith("acc_mean ≈ ")
    report = (out_dir / "correlation_report.txt").read_text()
    assert "in-sample fit (not a prediction)" in report and "leave-one-out" in report and "n = 16 trials" in report

    table = (out_dir / "search_results.csv").read_text().splitlines()
    assert len(table) == 17 and table[0].startswith("trial_number,run_id,success")
    run = client.get_run(run_id)
    assert run.data.tags[KIND] == "correlation" and run.data.params["target"] == "acc_mean"
    assert {
        "correlation_heatmap.png",
        "scatter_matrix.png",
        "correlation_report.txt",
        "prediction_model.json",
        "search_results.csv",
    } <= {a.path for a in client.list_artifacts(run_id)}


def fixed_table(seed: int, n: int, k: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    columns = {f"p{i}": rng.normal(0, 1, n) for i in range(k)}
    y = 0.6 - 0.05 * columns["p0"] + (0.02 * columns["p1"] if k > 1 else 0) + rng.normal(0, 0.03, n)
    return pd.DataFrame({**columns, "acc_mean": y})


# What the hand-written OLS, standard errors, F-test and leave-one-out loop gave on fixed_table(seed, n, k)
# before statsmodels and scikit-learn replaced them: (seed, n, k, max_predictors) -> the fitted model.
HAND_WRITTEN_FITS = {
    (3, 16, 3, 2): {
        "predictors": ["p0", "p1"],
        "formula": "acc_mean ≈ 0.5884 - 0.06268 × p0 + 0.03493 × p1",
        "coefficients": {"intercept": 0.5884418875462732, "p0": -0.06267587888576029, "p1": 0.034931586746978355},
        "std_errors": {"intercept": 0.006804948920420454, "p0": 0.0048584455398758605, "p1": 0.008572327894249637},
        "p_values": {"intercept": 2.4731853822009337e-19, "p0": 8.733488020820551e-09, "p1": 0.0013134615605988739},
        "r2": 0.9275959178880482,
        "mae": 0.01928471550469846,
        "f_p_value": 3.8766789804214215e-08,
        "loo_r2": 0.8761924102866183,
        "loo_mae": 0.024520741353692276,
    },
    (5, 6, 2, 2): {
        "predictors": ["p0"],
        "formula": "acc_mean ≈ 0.5885 - 0.05901 × p0",
        "coefficients": {"intercept": 0.5885486430772233, "p0": -0.05901448383979677},
        "std_errors": {"intercept": 0.01603321596217629, "p0": 0.019790284314565185},
        "p_values": {"intercept": 3.2882039742101852e-06, "p0": 0.040658645908675795},
        "r2": 0.689736818371312,
        "mae": 0.028909507736384583,
        "f_p_value": 0.040658645908675836,
        "loo_r2": 0.20919396598844775,
        "loo_mae": 0.04616893855011583,
    },
    (11, 25, 4, 3): {
        "predictors": ["p0", "p3", "p1"],
        "formula": "acc_mean ≈ 0.6042 - 0.0421 × p0 - 0.01603 × p3 + 0.02329 × p1",
        "coefficients": {
            "intercept": 0.6041922275562818,
            "p0": -0.04209507298323174,
            "p3": -0.016026311693817564,
            "p1": 0.023285341628974096,
        },
        "std_errors": {
            "intercept": 0.005029193411180143,
            "p0": 0.005475099419677884,
            "p3": 0.004502170766932998,
            "p1": 0.006279488274584249,
        },
        "p_values": {
            "intercept": 2.7504905864839776e-31,
            "p0": 1.547536915856466e-07,
            "p3": 0.001852039713768143,
            "p1": 0.001302610949018399,
        },
        "r2": 0.7914078891827918,
        "mae": 0.016033188263992554,
        "f_p_value": 2.425553766643529e-07,
        "loo_r2": 0.6882511985244042,
        "loo_mae": 0.019592635627170486,
    },
}


@pytest.mark.parametrize("case", list(HAND_WRITTEN_FITS))
def test_prediction_model_gives_the_numbers_of_the_hand_written_fit(case):
    seed, n, k, max_predictors = case
    table = fixed_table(seed, n, k)
    ranked = correlation.correlations(table, [f"p{i}" for i in range(k)], "acc_mean")
    model = correlation.prediction_model(table, ranked, "acc_mean", max_predictors)
    expected = HAND_WRITTEN_FITS[case]
    assert model["predictors"] == expected["predictors"] and model["formula"] == expected["formula"]
    for key, value in expected.items():
        if key not in ("predictors", "formula"):
            assert model[key] == pytest.approx(value, rel=1e-9, abs=1e-300), key
    assert (len(model["warnings"]) == 2) == (n < 10)


@pytest.mark.service
def test_correlation_of_a_small_study_warns(server, studies, tmp_path):
    """Another target, 6 trials: one predictor at most, and a warning."""
    analyse_here(correlation.main, server, "--study_name", "taylor-b", "--target", "acc_piqa", "--output_dir", str(tmp_path))
    model = json.loads((tmp_path / "prediction_model.json").read_text())
    assert model["n"] == 6 and model["target"] == "acc_piqa" and len(model["predictors"]) == 1
    assert any("fewer than 10" in w for w in model["warnings"])
    rho = stats.spearmanr(studies["taylor-b"]["grad_norm_ratio"], studies["taylor-b"]["acc_piqa"])[0]
    found = {c["predictor"]: c for c in json.loads((tmp_path / "correlations.json").read_text())["correlations"]}
    assert found["grad_norm_ratio"]["spearman_r"] == pytest.approx(rho) and found["grad_norm_ratio"]["n"] == 6


@pytest.mark.service
def test_correlation_bad_input_is_one_line(server, studies, capsys):
    err = one_line_error(capsys, correlation.main, ["--tracking_uri", server, "--study_name", "no-such-study"])
    assert "no trial runs (prunetrack.kind=prune) of study 'no-such-study'" in err and "taylor-a" in err
    err = one_line_error(
        capsys, correlation.main, ["--tracking_uri", server, "--study_name", "taylor-a", "--target", "acc_hellaswag"]
    )
    assert err.startswith("error: unknown target 'acc_hellaswag'; allowed for these trials: acc_boolq, acc_mean,")


# --------------------------------------------------------------------------- beam summary


@pytest.fixture(scope="module")
def beam_run(server, client, tmp_path_factory):
    """A beam search parent run with the results beam.py writes, summarised by the job."""
    drops = [
        {"vqa_a": 0.02, "vqa_b": 0.05, "cap_a": 0.01},
        {"vqa_a": 0.05, "vqa_b": 0.08, "cap_a": 0.02},
        {"vqa_a": 0.09, "vqa_b": 0.15, "cap_a": 0.04},
    ]
    removed = [[4], [4, 13], [4, 10, 13]]
    recommendations, previous = [], 0.0
    for k, (r, d) in enumerate(zip(removed, drops), 1):
        mean = float(np.mean(list(d.values())))
        recommendations.append(
            Recommendation(
                k,
                r,
                mean,
                float(np.std(list(d.values()))),
                3,
                mean - previous,
                16 - k,
                [b for b in range(16) if b not in r],
                d,
                f"hash{k}",
                None,
                True,
            )
        )
        previous = mean
    exp_id = tracking.experiment_id(client, "beam_search/synth_vlm")
    run_id = client.create_run(exp_id, tags={KIND: "beam_search"}).info.run_id
    tracking.log(client, run_id, params={"model": "synth_vlm", "criterion": "mean"}, tags={"task_type/cap_a": "captioning"})
    results = BeamResults("synth_vlm", ["vqa_a", "vqa_b", "cap_a"], 16, {"criterion": "mean"}, {}, None, recommendations, {})
    tracking.log_json(client, run_id, "beam_search_results.json", results.to_json())
    client.set_terminated(run_id, "FINISHED")
    out_dir = tmp_path_factory.mktemp("beam")
    out = analyse_here(
        beam_summary.main, server, "--model", "synth_vlm", "--task_types", "vqa_a=vqa,vqa_b=vqa", "--output_dir", str(out_dir)
    )
    return analysis_run_id(out), out_dir, drops


@pytest.mark.service
def test_beam_summary_table_intervals_and_task_types(client, beam_run):
    run_id, out_dir, drops = beam_run
    summary = json.loads((out_dir / "beam_summary.json").read_text())
    assert [r["removed_blocks"] for r in summary["rows"]] == [[4], [4, 13], [4, 10, 13]]
    for row, d in zip(summary["rows"], drops):
        sample = list(d.values())
        low, high = stats.t.interval(0.95, len(sample) - 1, loc=np.mean(sample), scale=stats.sem(sample))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high)) and row["n_datasets"] == 3
    means = [np.mean(list(d.values())) for d in drops]
    assert summary["rows"][1]["incremental_drop"] == pytest.approx(means[1] - means[0])
    assert summary["groups"]["vqa"]["mean_drop_by_num_removed"] == pytest.approx([(d["vqa_a"] + d["vqa_b"]) / 2 for d in drops])
    assert summary["groups"]["captioning"]["tasks"] == ["cap_a"]
    tex = (out_dir / "beam_table.tex").read_text()
    assert r"\midrule" in tex and r"synth\_vlm" in tex and "4, 10, 13" in tex
    assert client.get_run(run_id).data.tags[KIND] == "beam_summary"


# --------------------------------------------------------------------------- export


@pytest.mark.service
def test_export_uploads_once_reads_back_and_never_logs_credentials(
    server, client, moto_s3, consistency_run, correlation_run, beam_run, tmp_path, monkeypatch, capfd
):
    bucket = moto_s3.bucket("exports")
    run_ids = [consistency_run[0], correlation_run[0], beam_run[0]]
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_s3.endpoint_url,
    }
    args = ["--dest", f"s3://{bucket}/exp3", "--run_ids", ",".join(run_ids), "--output_dir", str(tmp_path)]
    first = analyse(server, "export", *args, env=env)

    expected = set()
    for run_id in run_ids:
        local = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
        for path in (p for p in local.rglob("*") if p.is_file()):
            key = f"exp3/{run_id}/{path.relative_to(local).as_posix()}"
            expected.add(key)
            assert moto_s3.client().get_object(Bucket=bucket, Key=key)["Body"].read() == path.read_bytes(), key
    assert set(moto_s3.keys(bucket)) == expected | {"exp3/manifest.json"}
    assert f"uploaded {len(expected) + 1}, skipped 0" in first.stdout

    manifest = json.loads(moto_s3.client().get_object(Bucket=bucket, Key="exp3/manifest.json")["Body"].read())
    assert set(manifest["runs"]) == set(run_ids)
    assert manifest["runs"][correlation_run[0]]["params"]["target"] == "acc_mean"
    assert manifest["runs"][consistency_run[0]]["kind"] == "consistency"
    assert manifest["code_version"] == {"prunetrack": version("prunetrack"), "git_commit": head_commit()}
    assert abs(datetime.strptime(manifest["exported_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp() - datetime.now().timestamp()) < 600
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    second = analyse_here(export.main, server, *args)
    assert f"uploaded 0, skipped {len(expected) + 1}" in second
    export_run = client.get_run(analysis_run_id(second))
    assert export_run.data.tags[KIND] == "export"
    assert export_run.data.metrics == {"uploaded": 0, "skipped": len(expected) + 1, "n_runs": 3}
    for text in (
        first.stdout + first.stderr,
        second,
        capfd.readouterr().err,
        json.dumps(manifest),
        json.dumps(export_run.data.params),
        json.dumps(export_run.data.tags),
    ):
        assert SECRET not in text and ACCESS not in text


@pytest.mark.service
def test_export_sends_large_files_in_parts_and_skips_them_on_a_rerun(client, moto_s3, tmp_path, monkeypatch):
    """A file above the multipart threshold goes up in parts; its ETag (not its MD5) is computed here
    beforehand, so that a rerun skips it."""
    monkeypatch.setattr(
        export,
        "TRANSFER",
        TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20, preferred_transfer_client="classic"),
    )  # S3's smallest part
    big, small = tmp_path / "big.json", tmp_path / "small.txt"
    big.write_bytes(np.random.default_rng(0).bytes(11 * 2**20))  # parts of 5, 5 and 1 MiB
    small.write_text("a small report\n")
    run_id = client.create_run(tracking.experiment_id(client, "export/large"), tags={KIND: "study"}).info.run_id
    client.log_artifact(run_id, str(big))
    client.log_artifact(run_id, str(small), "reports")
    client.set_terminated(run_id, "FINISHED")
    s3, bucket = moto_s3.client(), moto_s3.bucket("large")

    first = export.export(client, s3, bucket, "x", [client.get_run(run_id)])
    assert (first["uploaded"], first["skipped"]) == (3, 0)
    head = s3.head_object(Bucket=bucket, Key=f"x/{run_id}/big.json")
    assert head["ETag"].strip('"') == export.digests(big, export.TRANSFER)[1] and head["ETag"].endswith('-3"')
    assert head["ContentType"] == "application/json" and head["ContentLength"] == 11 * 2**20
    assert s3.get_object(Bucket=bucket, Key=f"x/{run_id}/big.json")["Body"].read() == big.read_bytes()
    objects = {o["key"]: o for o in first["manifest"]["runs"][run_id]["objects"]}
    assert objects[f"x/{run_id}/big.json"]["md5"] == hashlib.md5(big.read_bytes()).hexdigest()
    assert objects[f"x/{run_id}/reports/small.txt"] == {
        "key": f"x/{run_id}/reports/small.txt",
        "size": 15,
        "md5": hashlib.md5(b"a small report\n").hexdigest(),
    }

    second = export.export(client, s3, bucket, "x", [client.get_run(run_id)])
    assert (second["uploaded"], second["skipped"]) == (0, 3) and second["manifest"] == first["manifest"]


@pytest.mark.service
def test_export_missing_bucket_and_refused_credentials_are_one_line(server, moto_s3, consistency_run, capsys, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    base = ["--tracking_uri", server, "--run_ids", consistency_run[0]]
    err = one_line_error(
        capsys, export.main, [*base, "--dest", "s3://no-such-bucket-4242/x", "--endpoint_url", moto_s3.endpoint_url]
    )
    assert err == f"error: bucket 'no-such-bucket-4242' does not exist at {moto_s3.endpoint_url}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        f"{url}/moto-api/",
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
    ):  # moto checks credentials
        err = one_line_error(capsys, export.main, [*base, "--dest", "s3://any-bucket/x", "--endpoint_url", url])
    assert err.startswith(f"error: S3 at {url} refused the credentials for bucket 'any-bucket'") and SECRET not in err
    assert "s3://" in one_line_error(capsys, export.main, [*base, "--dest", "/tmp/not-s3"])


def test_url_passwords_are_masked():
    assert export.public("postgresql://lab:hunter2@db:5432/optuna") == "postgresql://lab:***@db:5432/optuna"
    assert export.public("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# --------------------------------------------------------------------------- the real tool's output


@pytest.mark.service
def test_consistency_on_real_sensitivity_studies(server, client, tiny_model_dir, tmp_path):
    """`python -m search.sensitivity` on a tiny random Llama, train and validation, then the analysis."""
    model_dir = tiny_model_dir()
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "search.sensitivity",
                "--model",
                model_dir,
                "--split",
                split,
                "--tasks",
                "pydoc_ppl,pydoc_cloze",
                "--n_samples",
                "6",
                "--device",
                "cpu",
                "--tracking_uri",
                server,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for split in ("train", "validation")
    ]  # 2 jobs, 2 cores
    for process in jobs:
        _, err = process.communicate()
        assert process.returncode == 0, err[-3000:]

    out = analyse_here(
        consistency.main, server, "--model", model_dir, "--n_resamples", "200", "--output_dir", str(tmp_path / "out")
    )
    result = json.loads((tmp_path / "out" / "consistency.json").read_text())
    assert set(result["datasets"]) == {"pydoc_ppl", "pydoc_cloze"}
    for task, d in result["datasets"].items():
        vectors = {}
        for split in ("train", "validation"):
            report = tracking.load_json(client, d[f"{split}_run_id"], "sensitivity.json")
            vectors[split] = report["importance"][task]
            # The per-example artifacts the tool logged give back exactly the importances it reported.
            runs = [report["child_runs"]["baseline"]] + [report["child_runs"][str(i)] for i in range(4)]
            per_example = [tracking.load_json(client, r, f"per_example/{task}.json") for r in runs]
            values, tokens = consistency.examples(per_example)
            recomputed = consistency.importances(values, tokens, np.ones((1, values.shape[1])))[0]
            assert recomputed == pytest.approx(vectors[split], abs=1e-9)
            assert d[f"n_examples_{split}"] == 6
        if np.ptp(vectors["train"]) and np.ptp(vectors["validation"]):
            r, p = stats.spearmanr(vectors["train"], vectors["validation"])
            assert (d["spearman_r"], d["p_value"]) == pytest.approx((r, p))
        else:  # a constant importance vector has no rank correlation
            assert d["spearman_r"] is None and not d["consistent"]
    assert "pydoc_ppl" in out
