"""The `taylor_study` entry point: Optuna studies over Taylor pruning settings on tiny models, workers on
PostgreSQL (exactly-once grid, a worker killed with SIGKILL), resume on SQLite, the report, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from helpers import runs
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from contract import names
from contract.names import STUDY_RESULTS
from search import trial_runner
from search.cli import run_main
from search.study import main

ROOT = Path(__file__).resolve().parents[1]
SEED_COLUMNS = [
    "trial_number",
    "state",
    "success",
    "taylor_seq_len",
    "taylor_num_samples",
    "pruning_ratio",
    "acc_pydoc_cloze",
    "acc_mean",
    "headline_mean",
    "ppl",
    "grad_norm_ratio",
    "grad_mean_ratio",
    "grad_std_ratio",
    "grad_max_ratio",
    "grad_mean_range",
    "grad_norm_range",
    "extreme_pruning_layers",
    "n_params_before",
    "n_params_after",
    "pruning_rate",
    "duration",
    "mlflow_run_id",
    "error",
]
WORKER_TIMEOUT = 240  # seconds; the machine is shared


@pytest.fixture(autouse=True)
def not_under_mlflow_run(monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


def write_config(tmp_path: Path, model: str, space: dict, name: str = "study.yaml", **keys) -> str:
    """A study config for the tiny model: 2 cloze examples, no perplexity or baseline."""
    data = {
        "model": model,
        "tasks": "pydoc_cloze",
        "ppl_task": "",
        "n_samples": 2,
        "batch_size": 4,
        "save_model": False,
        "baseline": False,
        "search_space": space,
        **keys,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def start_worker(config: str, storage: str, uri: str, tmp_path: Path, tag: str) -> subprocess.Popen:
    log = open(tmp_path / f"worker-{tag}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "search.study", "--config", config, "--storage", storage, "--tracking_uri", uri],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def finish(proc: subprocess.Popen, tmp_path: Path, tag: str) -> str:
    try:
        proc.wait(WORKER_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / f"worker-{tag}.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    return log


def trials_of(storage: str, name: str = "study") -> list:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def point(params: dict) -> tuple:
    return int(params["taylor_seq_len"]), int(params["taylor_num_samples"])


def results(client: MlflowClient, parent, folder: Path) -> pd.DataFrame:
    folder.mkdir(exist_ok=True)
    return pd.read_csv(client.download_artifacts(parent.info.run_id, STUDY_RESULTS, str(folder)))


@pytest.mark.service
def test_two_workers_on_postgres_cover_a_grid_exactly_once(tmp_path, tiny_model_dir, sqlite_store, postgres_db):
    grid = {"taylor_seq_len": [16, 32], "taylor_num_samples": [4, 8]}
    config = write_config(tmp_path, tiny_model_dir(), grid)
    uri, client = sqlite_store
    workers = [start_worker(config, postgres_db, uri, tmp_path, str(i)) for i in range(2)]
    logs = [finish(w, tmp_path, str(i)) for i, w in enumerate(workers)]

    trials = trials_of(postgres_db)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    expected = {(16, 4), (16, 8), (32, 4), (32, 8)}
    assert sorted(point(t.params) for t in complete) == sorted(expected)
    # Anything else is a trial that found the queue empty and evaluated nothing.
    assert all(t.state == TrialState.PRUNED and not t.params for t in trials if t not in complete)
    assert sum("A new study created" in log for log in logs) == 1  # the other worker joined it
    evaluated = [int(log.split("this worker evaluated ")[1].split()[0]) for log in logs]
    assert sum(evaluated) == 4, evaluated

    trial_runs = runs(client, "prune")
    assert len(trial_runs) == 4 and {r.info.status for r in trial_runs} == {"FINISHED"}
    assert sorted(point(r.data.params) for r in trial_runs) == sorted(expected)
    by_trial = {t.number: t for t in complete}
    for run in trial_runs:
        trial = by_trial[int(run.data.tags["optuna.trial_number"])]
        assert run.data.tags["optuna.study_name"] == "study" and trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.metrics["acc_mean"] == pytest.approx(trial.value)
        assert point(run.data.params) == point(trial.params) and run.data.params["trial_number"] == str(trial.number)
    [parent] = runs(client, "study")
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent.info.run_id}
    assert {r.info.experiment_id for r in trial_runs} == {parent.info.experiment_id}
    assert parent.data.tags["optuna.study_name"] == "study" and parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_complete"] == 4

    table = results(client, parent, tmp_path)
    assert list(table.columns) == SEED_COLUMNS
    assert len(table) == 4 and table["success"].all() and set(table["mlflow_run_id"]) == {r.info.run_id for r in trial_runs}
    row = table.set_index("mlflow_run_id").loc[trial_runs[0].info.run_id]
    assert row["grad_norm_ratio"] == pytest.approx(trial_runs[0].data.metrics["grad_norm_ratio"])
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"plots/{p}.png" for p in ("history", "param_importances", "parallel_coordinate", "contour")}


@pytest.mark.service
def test_a_worker_killed_mid_trial_is_redone_after_restart(tmp_path, tiny_model_dir, sqlite_store, postgres_db):
    grid = {"taylor_seq_len": [16, 32], "taylor_num_samples": [4]}
    config = write_config(tmp_path, tiny_model_dir(), grid, baseline=True)
    uri, client = sqlite_store
    worker = start_worker(config, postgres_db, uri, tmp_path, "first")
    deadline = time.monotonic() + WORKER_TIMEOUT
    while not any(r.info.status == "RUNNING" for r in runs(client, "prune")):
        assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker-first.log").read_text()[-3000:]
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    [killed] = [t for t in trials_of(postgres_db) if t.state == TrialState.RUNNING]

    finish(start_worker(config, postgres_db, uri, tmp_path, "restart"), tmp_path, "restart")
    trials = {t.number: t for t in trials_of(postgres_db)}
    assert trials[killed.number].state == TrialState.FAIL
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert sorted(point(t.params) for t in complete) == [(16, 4), (32, 4)]
    assert len(trials) == 3  # the two points and the killed attempt, nothing waiting or evaluated twice

    trial_runs = runs(client, "prune")
    finished = [r for r in trial_runs if r.info.status == "FINISHED"]
    assert sorted(point(r.data.params) for r in finished) == [(16, 4), (32, 4)]
    [dead] = [r for r in trial_runs if r.info.status != "FINISHED"]
    assert dead.info.status == "KILLED" and dead.data.tags["optuna.trial_number"] == str(killed.number)
    # taken over at once: its process on this machine is known dead, no waiting for the grace period
    assert dead.data.tags[names.ERROR].startswith("worker process ") and "died; trial redone" in dead.data.tags[names.ERROR]
    # The unpruned baseline is one configuration run shared by the trials.
    assert [r.info.status for r in runs(client, "config")].count("FINISHED") == 1

    [parent] = runs(client, "study")
    assert "Trials: 2 complete, 0 failed" in parent.data.tags[names.DESCRIPTION]
    table = results(client, parent, tmp_path)
    assert len(table) == 3 and table["success"].sum() == 2
    assert table.set_index("trial_number").loc[killed.number, "state"] == "FAIL"


def test_resume_on_sqlite_completes_the_grid_without_repeats(tmp_path, tiny_model_dir, sqlite_store, capsys, monkeypatch):
    grid = {"taylor_seq_len": [16, 24, 32], "taylor_num_samples": [4]}
    config = write_config(tmp_path, tiny_model_dir(), grid, ppl_task="pydoc_ppl")
    storage, (uri, client) = f"sqlite:///{tmp_path}/optuna.db", sqlite_store
    args = ["--config", config, "--storage", storage, "--tracking_uri", uri]

    main([*args, "--n_trials", "1"])  # stops after one trial
    assert [t.state.name for t in trials_of(storage)] == ["COMPLETE", "WAITING", "WAITING"]

    def ctrl_c(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # the next start is interrupted mid-trial
        patch.setattr(trial_runner, "prune_and_evaluate", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            main(args)
    trials = trials_of(storage)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING", "WAITING"]
    assert point(trials[3].params) == (24, 4)  # its point enqueued again

    main(args)
    assert "this worker evaluated 2" in capsys.readouterr().out
    main(args)  # a complete study: nothing to do, the report is rebuilt
    assert "this worker evaluated 0" in capsys.readouterr().out
    worker = client.create_run(runs(client, "study")[0].info.experiment_id).info.run_id  # made up name, as `mlflow run` gives
    with monkeypatch.context() as patch:  # a worker started later by `mlflow run`: named like every run, and says what it did
        patch.setenv("MLFLOW_RUN_ID", worker)
        main(args)
    worker_run = client.get_run(worker)
    assert worker_run.info.run_name.startswith("study_worker ") and worker_run.data.tags["prunetrack.kind"] == "study_worker"
    assert "evaluated 0 trials" in worker_run.data.tags[names.DESCRIPTION]

    trials = trials_of(storage)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 4 and sorted(point(t.params) for t in complete) == [(16, 4), (24, 4), (32, 4)]
    trial_runs = runs(client, "prune")
    finished = [r for r in trial_runs if r.info.status == "FINISHED"]
    assert sorted(point(r.data.params) for r in finished) == [(16, 4), (24, 4), (32, 4)]
    [interrupted] = [r for r in trial_runs if r.info.status != "FINISHED"]
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["optuna.trial_number"] == "1"
    [parent] = runs(client, "study")
    assert "Trials: 3 complete, 0 failed" in parent.data.tags[names.DESCRIPTION]
    table = results(client, parent, tmp_path)
    assert list(table.columns) == SEED_COLUMNS and table["ppl"].notna().sum() == 3
    assert table["taylor_seq_len"].tolist() == [16, 24, 32, 24]
    assert table["success"].tolist() == [True, False, True, True]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/history.png", "plots/parallel_coordinate.png"}  # one parameter varies
    assert "contour: needs 2 parameters with different values" in parent.data.tags["plots_skipped"]

    # On demand: the report again, from the store, after a run's metric was corrected.
    client.log_metric(finished[0].info.run_id, "acc_mean", 0.75)
    main([*args, "--report_only", "true"])
    table = results(client, parent, tmp_path / "again")
    assert table.set_index("mlflow_run_id").loc[finished[0].info.run_id, "acc_mean"] == 0.75


def test_tpe_study_records_a_failed_trial_and_goes_on(tmp_path, tiny_model_dir, sqlite_store, monkeypatch):
    config = write_config(
        tmp_path,
        tiny_model_dir(),
        {"taylor_seq_len": {"low": 8, "high": 64}, "pruning_ratio": {"low": 0.1, "high": 0.4}},
        n_trials=3,
        taylor_num_samples=4,
        sampler_seed=1,
    )
    storage, (uri, client) = f"sqlite:///{tmp_path}/optuna.db", sqlite_store
    calls, real = [], trial_runner.prune_and_evaluate

    def second_fails(client, run_id, exp_id, settings):
        calls.append(settings)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(client, run_id, exp_id, settings)

    monkeypatch.setattr(trial_runner, "prune_and_evaluate", second_fails)
    main(["--config", config, "--storage", storage, "--tracking_uri", uri])

    trials = trials_of(storage)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert all(8 <= t.params["taylor_seq_len"] <= 64 and 0.1 <= t.params["pruning_ratio"] <= 0.4 for t in trials)
    trial_runs = {int(r.data.tags["optuna.trial_number"]): r for r in runs(client, "prune")}
    assert [trial_runs[n].info.status for n in range(3)] == ["FINISHED", "FAILED", "FINISHED"]
    assert trial_runs[1].data.tags[names.ERROR].startswith("RuntimeError: CUDA error")
    assert [float(trial_runs[n].data.params["pruning_ratio"]) for n in range(3)] == [s.pruning_ratio for s in calls]
    [parent] = runs(client, "study")
    assert "Trials: 2 complete, 1 failed" in parent.data.tags[names.DESCRIPTION]
    table = results(client, parent, tmp_path)
    assert table["success"].tolist() == [True, False, True]
    assert table["pruning_ratio"].tolist() == pytest.approx([t.params["pruning_ratio"] for t in trials])
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_complete"] == 2


def test_a_user_error_in_a_trial_stops_the_worker_and_keeps_the_queue(tmp_path, tiny_model_dir, sqlite_store, capsys):
    config = write_config(tmp_path, tiny_model_dir(), {"taylor_seq_len": [512, 16], "taylor_num_samples": [4]})
    storage, (uri, client) = f"sqlite:///{tmp_path}/optuna.db", sqlite_store
    assert run_main(main, ["--config", config, "--storage", storage, "--tracking_uri", uri]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: seq_len 512 out of range; allowed: 1..256 (the model's context)"
    )
    first, second = trials_of(storage)
    assert first.state == TrialState.FAIL and first.user_attrs["error"].startswith("ModelError: seq_len 512")
    assert second.state == TrialState.WAITING  # not lost: the next start takes it
    [run] = runs(client, "prune")
    assert run.info.status == "FAILED" and not run.data.metrics


BAD_INPUT = [
    ("model: [unclosed", "error: config study.yaml is not valid YAML: while parsing a flow sequence"),
    ({"colour": "red"}, "error: config study.yaml: unknown key 'colour'; allowed: study_name, storage, sampler"),
    (
        {"objective": "acc_piqa"},
        "error: config study.yaml: unknown objective metric 'acc_piqa'; allowed: acc_mean, acc_norm_pydoc_cloze",
    ),
    (
        {"search_space": {"pruning_ratio": [0.2, 1.5]}},
        "error: config study.yaml: search_space.pruning_ratio: pruning_ratio 1.5 out of range; allowed: 0 < ratio < 1",
    ),
    (
        {"search_space": {"taylor_seq_len": [0, 16]}},
        "error: config study.yaml: search_space.taylor_seq_len: taylor_seq_len 0 out of range; allowed: >= 1",
    ),
    (
        {"search_space": {"taylor_seq_len": {"low": 16, "high": 64}}, "sampler": "grid"},
        "error: config study.yaml: a grid needs a list of values for every parameter; use sampler: tpe for ranges",
    ),
    (
        {"storage": "postgresql://postgres@127.0.0.1:1/optuna"},
        "error: cannot use Optuna storage 'postgresql+psycopg2://postgres@127.0.0.1:1/optuna': connection to server",
    ),
]


@pytest.mark.parametrize("change, expected", BAD_INPUT)
def test_bad_input_is_one_line_before_anything_is_recorded(tmp_path, change, expected, capsys):
    if isinstance(change, str):
        (tmp_path / "study.yaml").write_text(change)
    else:
        write_config(tmp_path, "default", {"taylor_seq_len": [16, 32]}, **change)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"sqlite:///{tmp_path}/optuna.db"
    argv = ["--config", str(tmp_path / "study.yaml"), "--tracking_uri", uri]
    if "storage" not in change:
        argv += ["--storage", storage]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err  # store set-up logs may precede the one error line
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(expected), err[-2000:]
    if (tmp_path / "mlflow.db").exists():
        assert runs(MlflowClient(uri)) == []
    if (tmp_path / "optuna.db").exists():
        assert optuna.get_all_study_names(storage) == []
