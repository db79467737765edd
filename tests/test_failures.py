"""Every failure a clean one (#14): bad input is one line `error: ...` (exit 2) that names the value and what is
allowed; the run `mlflow run` opened ends FAILED with `prunetrack.error`; Ctrl-C and SIGTERM leave nothing
RUNNING; runs and trials of a dead process on this machine are closed or taken over at once; an unreachable store
is reported within 30 s; secrets never need to pass through -P."""

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import mlflow_run, runs
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from contract import cli, names, profiles, stores, tracking
from pruning.tasks import TaskError, load_task
from search.cli import run_main

ROOT = Path(__file__).resolve().parents[1]
PIQA = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}


@pytest.fixture(autouse=True)
def not_under_mlflow_run(monkeypatch):
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "PRUNETRACK_PROFILE", *stores.FAST_REQUESTS):
        monkeypatch.delenv(name, raising=False)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- bad data files


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "piqa/validation.jsonl is empty; allowed: one JSON record per line"),
        ("\n\n", "piqa/validation.jsonl is empty; allowed: one JSON record per line"),
        (
            '{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{bad\n',
            "piqa/validation.jsonl:2: not a JSON record (Expecting property name enclosed in double quotes at column 2); "
            "allowed: one JSON object per line",
        ),
        ("[1, 2]\n", "piqa/validation.jsonl:1: a JSON list, not a record; allowed: one JSON object per line"),
    ],
)
def test_a_bad_data_file_is_named_with_its_line(tmp_path, text, expected):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text(text)
    with pytest.raises(TaskError) as info:
        load_task("piqa", "validation", 2, 0, str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}/{expected}")
    assert "put validation.jsonl" not in str(info.value)


@pytest.mark.service
def test_an_empty_data_file_fails_the_study_in_one_line(tmp_path, sqlite_store):
    """Through the command: exit 2, one line, the study run FAILED with the reason."""
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text("")
    uri, client = sqlite_store
    out = subprocess.run(
        [sys.executable, "-m", "search.sensitivity", "--tasks", "piqa", "--data_dir", str(tmp_path), "--tracking_uri", uri],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert (
        last_line(out.stderr) == f"error: {tmp_path}/piqa/validation.jsonl is empty; allowed: one JSON record per line "
        "(or remove it to use the hub's copy)"
    )
    [run] = runs(client)
    assert run.info.status == "FAILED" and "is empty" in run.data.tags[names.ERROR]


# --------------------------------------------------------------------------- tracking stores


def test_a_sqlite_store_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(tracking.TrackingError) as info:
        tracking.connect(f"sqlite:///{tmp_path}/afile/mlflow.db")
    assert str(info.value) == (
        f"tracking URI 'sqlite:///{tmp_path}/afile/mlflow.db': '{tmp_path}/afile' is a file, "
        "not a folder; allowed: sqlite:///<path to a .db file in a folder>"
    )
    with pytest.raises(tracking.TrackingError, match="names the folder"):
        tracking.connect(f"sqlite:///{tmp_path}")


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503)
        self.end_headers()
        self.wfile.write(b"overloaded")

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["refused", "503"])
def test_an_unreachable_or_refusing_store_is_reported_within_30_s(server):
    """MLflow's own defaults retry for minutes; the start-up check gives up in seconds."""
    if server == "refused":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # nothing listens once closed
        httpd = None
    else:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
        port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(tracking.TrackingError) as info:
            tracking.connect(f"http://127.0.0.1:{port}")
    finally:
        if httpd:
            httpd.shutdown()
    assert time.monotonic() - start < 30
    assert str(info.value).startswith(f"cannot reach tracking store 'http://127.0.0.1:{port}'")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the fast settings do not leak


def test_the_closing_hint_fits_the_store():
    assert tracking.ui_hint("http://mlflow.lab:5000/") == "open http://mlflow.lab:5000 in a browser"
    assert tracking.ui_hint("sqlite:///mlflow.db").startswith("mlflow ui --backend-store-uri sqlite:///mlflow.db")


# --------------------------------------------------------------------------- arguments and the mlflow run run


@pytest.mark.parametrize(
    "module, argv, expected",
    [
        ("search.sensitivity", ["--n_samples", "abc"], "error: n_samples 'abc' is not valid; allowed: an integer"),
        ("search.prune", ["--baseline", "maybe"], "error: baseline 'maybe' is not valid; allowed: true, false"),
        ("search.prune", ["--pruning_ratio", "1.5"], "error: pruning_ratio 1.5 out of range; allowed: 0 < ratio < 1"),
        ("search.study", ["--report_only", "yes"], "error: report_only 'yes' is not valid; allowed: true, false"),
        ("search.study", ["--colour", "red"], "error: unrecognized arguments: --colour red; allowed: the options of"),
    ],
)
def test_a_rejected_setting_fails_the_run_mlflow_run_opened(sqlite_store, monkeypatch, capsys, module, argv, expected):
    uri, client = sqlite_store
    launched = client.create_run(tracking.experiment_id(client, "launched")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    main = __import__(module, fromlist=["main"]).main
    assert run_main(main, [*argv, "--tracking_uri", uri]) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith(expected)
    run = client.get_run(launched)
    assert run.info.status == "FAILED" and run.data.tags[names.ERROR].endswith(line.removeprefix("error: "))


MLFLOW_RUN_BAD_INPUT = [
    ("beam_search", "beam_width=0", "error: beam_width must be at least 1, got 0"),
    ("prune", "pruning_ratio=1.5", "error: pruning_ratio 1.5 out of range; allowed: 0 < ratio < 1"),
    ("taylor_study", "config=missing", "error: study config 'missing' not found; available: "),
    ("sensitivity", "n_samples=abc", "error: n_samples 'abc' is not valid; allowed: an integer"),
]


@pytest.mark.parametrize("entry, param, expected", MLFLOW_RUN_BAD_INPUT)
@pytest.mark.service
def test_bad_input_under_mlflow_run_is_one_line_and_a_failed_run(tmp_path, sqlite_store, entry, param, expected):
    _, client = sqlite_store
    out = mlflow_run(f"sqlite:///{tmp_path}/mlflow.db", entry, param, cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith(expected), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr, out.stderr[-3000:]
    assert "secret" not in ours[0]
    [run] = runs(client)
    assert run.info.status == "FAILED"
    assert run.data.tags[names.ERROR].endswith(ours[0].removeprefix("error: "))


@pytest.mark.parametrize("entry", ["taylor_study", "beam_search"])
@pytest.mark.service
def test_a_password_passed_through_mlflow_run_is_not_kept(tmp_path, sqlite_store, entry):
    """mlflow run records -P values as params before prunetrack starts: the run is deleted, then purged."""
    _, client = sqlite_store
    out = mlflow_run(f"sqlite:///{tmp_path}/mlflow.db", entry, "storage=postgresql://user:pw-Zq81x@db.lab/optuna", cwd=tmp_path)
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, out.stderr[-3000:]
    assert ours[0].startswith("error: storage 'postgresql://user:***@db.lab/optuna' holds a password")
    assert ours[0].endswith("which is deleted and purged (mlflow gc) as soon as mlflow run exits")
    assert "Traceback" not in out.stderr and "pw-Zq81x" not in ours[0], out.stderr[-3000:]
    deadline = time.time() + 300  # the helper waits for mlflow run to exit, then starts `mlflow gc`
    while runs(client) or client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=3):
        assert time.time() < deadline, "the run was not purged"
        time.sleep(0.5)
    client._tracking_client.store.engine.dispose()
    assert b"pw-Zq81x" not in (tmp_path / "mlflow.db").read_bytes()


# --------------------------------------------------------------------------- secrets: storage profiles


def test_storage_takes_a_profile_and_refuses_a_password(tmp_path, monkeypatch):
    assert profiles.storage("local") == "sqlite:///optuna.db"
    monkeypatch.setenv("PRUNETRACK_LAB_STORAGE", "postgresql+psycopg2://lab:from-env@db.lab/optuna")
    assert profiles.storage("lab") == "postgresql+psycopg2://lab:from-env@db.lab/optuna"  # the environment's password
    monkeypatch.delenv("PRUNETRACK_LAB_STORAGE")
    assert profiles.storage("lab") == "postgresql+psycopg2://prunetrack@mlflow-db.lab:5432/prunetrack"
    assert profiles.storage("postgresql://user@db/optuna") == "postgresql://user@db/optuna"  # PGPASSWORD, ~/.pgpass
    assert profiles.storage("optuna.db") == "optuna.db"  # a file path stays one
    with pytest.raises(profiles.ProfileError) as info:
        profiles.storage("postgresql://user:secret@db/optuna")
    assert "secret" not in str(info.value) and "PGPASSWORD or ~/.pgpass" in str(info.value)
    bare = tmp_path / "bare.yaml"
    bare.write_text("tracking_uri: sqlite:///mlflow.db\n")
    with pytest.raises(profiles.ProfileError, match="has no storage"):
        profiles.storage(str(bare))
    from search.study import parser

    assert parser().parse_args(["--storage", "local"]).storage == "sqlite:///optuna.db"
    with pytest.raises(cli.UsageError, match="holds a password"):
        parser().parse_args(["--storage", "mysql://root:secret@db/optuna"])


# --------------------------------------------------------------------------- Ctrl-C, SIGTERM, dead processes


def _study_interrupted_in_flight(client: MlflowClient, how: str):
    def main(argv):
        with tracking.study_run(client, "sensitivity", "stops", {}) as (run_id, exp_id):
            child = tracking.open_child(client, exp_id, run_id, "abc", "remove[1]", {names.KIND: "config"}, {})
            try:  # what the configuration code does around an evaluation
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
                raise KeyboardInterrupt
            except BaseException as err:
                tracking.fail(client, child, err)
                raise

    return main


@pytest.mark.parametrize("how, code, reason", [("ctrl-c", 130, "interrupted (Ctrl-C)"), ("sigterm", 143, "terminated (SIGTERM)")])
@pytest.mark.parametrize("launched", [False, True])
def test_a_stopped_study_leaves_nothing_running(sqlite_store, monkeypatch, capsys, how, code, reason, launched):
    uri, client = sqlite_store
    if launched:  # under mlflow run, the run it opened is the study run
        monkeypatch.setenv("MLFLOW_RUN_ID", client.create_run(tracking.experiment_id(client, "x")).info.run_id)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = signal.getsignal(signal.SIGTERM)
    assert run_main(_study_interrupted_in_flight(client, how)) == code
    assert signal.getsignal(signal.SIGTERM) is before
    assert last_line(capsys.readouterr().err) == f"error: {reason}; the runs in flight are marked KILLED"
    stopped = runs(client)
    assert len(stopped) == 2
    for run in stopped:
        assert run.info.status == "KILLED" and reason in run.data.tags[names.ERROR]


def test_a_dead_workers_run_is_closed_by_a_survivor(sqlite_store):
    uri, client = sqlite_store
    exp_id = tracking.experiment_id(client, "beam_search/m")
    dead = client.create_run(
        exp_id, tags={names.KIND: "beam_search", names.HOST: socket.gethostname(), names.PID: str(dead_pid())}
    ).info.run_id
    alive = client.create_run(exp_id, tags={names.KIND: "beam_search", names.HOST: "another-host", names.PID: "1"}).info.run_id
    with tracking.study_run(client, "beam_search", "beam_search/m", {}):
        pass
    run = client.get_run(dead)
    assert run.info.status == "KILLED" and "died before the run finished" in run.data.tags[names.ERROR]
    assert client.get_run(alive).info.status == "RUNNING"  # another machine: its heartbeat decides


def test_a_dead_optuna_workers_trial_is_taken_over_at_once(tmp_path, sqlite_store):
    from search import study_spec, study_storage, trial_runner
    from search.work import Claims

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"tasks": "pydoc_cloze", "ppl_task": "", "search_space": {"taylor_seq_len": [16, 32]}}))
    uri, client = sqlite_store
    spec = study_spec.load_spec(str(config), f"sqlite:///{tmp_path}/optuna.db")
    study, parent = study_storage.open_study(spec, study_storage.open_storage(spec), client)
    with Claims(spec.storage) as claims:
        trial = study.ask()  # a worker took the first grid point, claimed it, then died
        key, pid = trial_runner.trial_key(study, trial.number), dead_pid()
        assert claims.take(key, None)
        with claims.engine.begin() as conn:
            conn.execute(claims.table.update().values(owner=f"{socket.gethostname()}:{pid}:dead"))
        run = client.create_run(
            client.get_run(parent).info.experiment_id,
            tags={"mlflow.parentRunId": parent, names.KIND: names.PRUNE, names.TRIAL_NUMBER: str(trial.number)},
        )
        live = study.ask()  # another worker's trial, alive (this process)
        assert claims.take(trial_runner.trial_key(study, live.number), None)

        assert trial_runner.fail_stopped_trials(study, claims, client, spec.max_retry) == 1
        trials = {t.number: t for t in study.get_trials()}
        assert trials[trial.number].state == TrialState.FAIL and trials[live.number].state == TrialState.RUNNING
        [again] = [t for t in trials.values() if t.state == TrialState.WAITING]
        assert again.params == trials[trial.number].params  # the point is enqueued again
        killed = client.get_run(run.info.run_id)
        assert killed.info.status == "KILLED"
        assert killed.data.tags[names.ERROR] == f"worker process {socket.gethostname()}:{pid} died; trial redone"
        assert claims.rows([key])[key].status == "failed"
        assert trial_runner.fail_stopped_trials(study, claims, client, spec.max_retry) == 0


# --------------------------------------------------------------------------- Ctrl-C and a dead launcher under mlflow run

# Imported by the search's interpreter only (mlflow run sets MLFLOW_RUN_ID for its child): its third
# evaluate_many, inside step 2 with that step's runs RUNNING, writes the process id, then waits to be stopped.
STALLING_SITE = """
import os
if os.environ.get("MLFLOW_RUN_ID") and os.environ.get("STALLED"):
    import time
    from pruning import evaluate

    plain, calls = evaluate.Evaluator.evaluate_many, []

    def stall(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            with open(os.environ["STALLED"] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(os.environ["STALLED"] + ".tmp", os.environ["STALLED"])
            time.sleep(600)
        return plain(self, *args, **kwargs)

    evaluate.Evaluator.evaluate_many = stall
"""


def beam_search_stalled_in_step_2(tmp_path, uri: str, model: str) -> tuple[subprocess.Popen, int]:
    """`mlflow run -e beam_search` as users start it, in a process group of its own, stalled inside step 2;
    (the launcher, the search's process id)."""
    site, stalled = tmp_path / "site", tmp_path / "stalled"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STALLING_SITE)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": f"{site}:{ROOT}",
        "STALLED": str(stalled),
        "OMP_NUM_THREADS": "1",
    }
    params = [f"model={model}", "n_samples=4", "batch_size=16", "max_removed=2", "beam_width=2", "racing=false"]
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "beam_search", "--env-manager", "local"]
    log = (tmp_path / "launcher.log").open("w")
    proc = subprocess.Popen(
        cmd + [x for p in params for x in ("-P", p)], env=env, cwd=tmp_path, stdout=log, stderr=log, start_new_session=True
    )
    deadline = time.time() + 300
    while not stalled.exists():
        assert proc.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
        assert time.time() < deadline, "the search did not reach step 2"
        time.sleep(0.2)
    return proc, int(stalled.read_text())


def wait_gone(pid: int, seconds: float) -> float:
    """How long process `pid` took to exit (at most `seconds`)."""
    start = time.monotonic()
    while tracking.process_alive(socket.gethostname(), pid):
        assert time.monotonic() - start < seconds, f"process {pid} still runs after {seconds} s"
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.mark.parametrize("how", ["ctrl-c", "launcher-killed"])
@pytest.mark.service
def test_mlflow_run_stopped_leaves_nothing_running(tmp_path, sqlite_store, tiny_model_dir, how):
    """Ctrl-C: SIGINT to the whole group, then mlflow's SIGTERM to the search, which must not cut its clean-up
    short. The launcher killed alone: the search notices (parent-death signal) and stops within seconds."""
    uri, client = sqlite_store
    launcher, search = beam_search_stalled_in_step_2(tmp_path, uri, tiny_model_dir(layers=6, initializer_range=0.3))
    in_flight = runs(client, "config", "RUNNING")
    assert len(in_flight) > 1  # step 2's candidates, scored together
    if how == "ctrl-c":
        os.killpg(launcher.pid, signal.SIGINT)
        launcher.wait(timeout=120)
        reason = "interrupted (Ctrl-C)"
    else:
        os.kill(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=30)
        reason = "terminated (SIGTERM)"
    assert wait_gone(search, 30) < 30
    log = (tmp_path / "launcher.log").read_text()
    assert runs(client, status="RUNNING") == [], log[-3000:]
    deadline = time.time() + 60  # mlflow run writes FAILED over it on its way out; prunetrack's helper then KILLED
    while runs(client, "beam_search")[0].info.status != "KILLED":
        assert time.time() < deadline, runs(client, "beam_search")[0].info.status
        time.sleep(0.2)
    killed = runs(client, status="KILLED")
    assert {r.info.run_id for r in in_flight} < {r.info.run_id for r in killed}  # the parent too
    for run in killed:
        assert reason in run.data.tags[names.ERROR]
    ours = [line for line in log.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: {reason}; the runs in flight are marked KILLED"], log[-3000:]
