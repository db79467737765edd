"""Tracking profiles: lookup and precedence, the lab server (PostgreSQL + S3 through the server)
started by its one command, a real `mlflow run` study against it, basic auth, health at start."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
from helpers import mlflow_run
from servers import MLFLOW_SERVER_ENV, free_port, postgres_database, server_process

from contract import profiles, tracking

ROOT = Path(__file__).resolve().parents[1]
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
S3_VARS = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """connect() sets MLflow's global tracking URI; give the next test MLflow's own lookup back."""
    yield
    mlflow.set_tracking_uri(None)


def worker_env(**extra) -> dict:
    """A job's environment: this one without any S3 setting or tracking choice, plus `extra`."""
    drop = (*S3_VARS, "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", profiles.ENV_VAR)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, **FAST_FAIL, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", **extra}


# --------------------------------------------------------------------------- profiles, no server


def test_profiles_lookup_and_errors(tmp_path, monkeypatch):
    assert profiles.available()[:2] == ["lab", "local"]
    assert profiles.load("local").tracking_uri == "sqlite:///mlflow.db"
    monkeypatch.delenv("PRUNETRACK_LAB_URI", raising=False)
    assert profiles.load("lab").tracking_uri == "http://mlflow.lab:5000"
    monkeypatch.setenv("PRUNETRACK_LAB_URI", "http://10.0.0.7:5000")
    assert profiles.load("lab").tracking_uri == "http://10.0.0.7:5000"

    with pytest.raises(profiles.ProfileError, match=r"^unknown profile 'nope'; available: lab, local, or a path"):
        profiles.load("nope")
    custom = tmp_path / "mine.yaml"
    custom.write_text(
        "tracking_uri: http://${MY_HOST}:5000\nserver:\n  backend_store_uri: sqlite:///x.db\n"
        "  artifacts_destination: /tmp/a\n  auth: {database_uri: sqlite:///a.db, default_permission: ALL}\n"
    )
    monkeypatch.delenv("MY_HOST", raising=False)
    with pytest.raises(profiles.ProfileError, match="environment variable MY_HOST is not set \\(used in tracking_uri\\)"):
        _ = profiles.load(str(custom)).tracking_uri  # resolving the URI raises
    monkeypatch.setenv("MY_HOST", "gpu-box")
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "k")
    with pytest.raises(profiles.ProfileError, match="default_permission 'ALL'; allowed: READ, EDIT, MANAGE, NO_PERMISSIONS"):
        profiles.server_command(profiles.load(str(custom)))
    monkeypatch.setenv("PRUNETRACK_LAB_DB", "sqlite:///lab.db")
    schema, server, _ = profiles.server_command(profiles.load("lab"))
    assert schema[-3:] == ["db", "upgrade", "sqlite:///lab.db"]
    assert server[server.index("--allowed-hosts") + 1] == "10.0.0.7,10.0.0.7:*,localhost:*,127.0.0.1:*"
    assert "--serve-artifacts" in server and "--app-name" not in server
    with pytest.raises(profiles.ProfileError, match="profile 'local' has no server section"):
        profiles.server_command(profiles.load("local"))


def test_precedence(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", profiles.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert profiles.resolve() == (f"sqlite:///{tmp_path}/mlflow.db", "the default")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert profiles.resolve()[0] == f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv(profiles.ENV_VAR, "local")
    assert profiles.resolve() == ("sqlite:///mlflow.db", "PRUNETRACK_PROFILE=local")
    assert profiles.resolve(f"sqlite:///{tmp_path}/arg.db")[0] == f"sqlite:///{tmp_path}/arg.db"
    monkeypatch.setenv("PRUNETRACK_LAB_URI", "http://127.0.0.1:9")
    assert profiles.resolve("lab") == ("http://127.0.0.1:9", "profile 'lab'")


def test_run_from_another_store_fails_at_start(tmp_path, monkeypatch):
    """`PRUNETRACK_PROFILE=local mlflow run` launched with another store: one line, nothing opened."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/launcher.db")
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc123")
    monkeypatch.setenv(profiles.ENV_VAR, "local")
    with pytest.raises(tracking.TrackingError) as info:
        tracking.connect()
    assert str(info.value) == (
        f"mlflow run started run abc123 in 'sqlite:///{tmp_path}/launcher.db' but "
        "PRUNETRACK_PROFILE=local names 'sqlite:///mlflow.db': give mlflow run the same store "
        "(MLFLOW_TRACKING_URI=sqlite:///mlflow.db mlflow run ...)"
    )
    assert not (tmp_path / "launcher.db").exists()


def test_unknown_profile_is_one_line(monkeypatch):
    monkeypatch.delenv(profiles.ENV_VAR, raising=False)
    with pytest.raises(tracking.TrackingError) as info:
        tracking.connect("lab2")
    assert str(info.value) == "unknown profile 'lab2'; available: lab, local, or a path to a .yaml file"
    out = subprocess.run([sys.executable, "-m", "contract.profiles", "serve", "lab2"], cwd=ROOT, capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (2, f"error: {info.value}\n")


@pytest.mark.service
def test_serve_stops_at_a_missing_database():
    """The server command checks its database first: one line, password hidden, no retry loop."""
    from sqlalchemy.engine import make_url

    with postgres_database() as db:  # a server that answers (or a skip); then a database it lacks
        missing = make_url(db).set(password="s3cret", database="prunetrack_no_such_db").render_as_string(False)
    out = subprocess.run(
        [sys.executable, "-m", "contract.profiles", "serve", "lab"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PRUNETRACK_LAB_DB": missing},
        timeout=60,
    )
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith("error: profile 'lab': cannot connect to the backend store postgresql+psycopg2://")
    assert 'database "prunetrack_no_such_db" does not exist' in out.stderr
    assert ":***@" in out.stderr and "s3cret" not in out.stderr


# --------------------------------------------------------------------------- the lab server


@pytest.fixture(scope="module")
def lab(moto_s3):
    """The shipped `lab` profile pointed at this machine (PostgreSQL, moto S3) through its variables,
    its server started with the one command; yields (the variables, the bucket: not created yet)."""
    bucket, port = f"lab-{uuid.uuid4().hex[:10]}", free_port()
    with postgres_database() as db:
        settings = {
            "PRUNETRACK_LAB_URI": f"http://127.0.0.1:{port}",
            "PRUNETRACK_LAB_DB": db,
            "PRUNETRACK_LAB_ARTIFACTS": f"s3://{bucket}/studies",
            "PRUNETRACK_LAB_S3_ENDPOINT": moto_s3.endpoint_url,
            "PRUNETRACK_LAB_HOST": "127.0.0.1",
            "PRUNETRACK_LAB_PORT": str(port),
            "PRUNETRACK_LAB_WORKERS": "2",
        }
        server_env = {
            **os.environ,
            **MLFLOW_SERVER_ENV,
            **settings,
            **{k: v for k, v in moto_s3.env.items() if k.startswith("AWS_")},
        }
        server_env.pop("MLFLOW_S3_ENDPOINT_URL", None)  # the profile's s3_endpoint_url must carry it
        cmd = [sys.executable, "-m", "contract.profiles", "serve", "lab"]
        with server_process(cmd, f"http://127.0.0.1:{port}/health", env=server_env, cwd=str(ROOT)):
            yield settings, bucket


@pytest.mark.service
def test_lab_study_through_mlflow_run(lab, moto_s3, tiny_model_dir, tmp_path, monkeypatch):
    settings, bucket = lab
    # A job started while the server's bucket is missing stops at its start, with the server's reason.
    for var, value in {**FAST_FAIL, profiles.ENV_VAR: "lab", "PRUNETRACK_LAB_URI": settings["PRUNETRACK_LAB_URI"]}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with pytest.raises(tracking.TrackingError) as info:
        tracking.connect()
    assert str(info.value) == (
        f"cannot reach the artifact storage 'mlflow-artifacts:/0' of '{settings['PRUNETRACK_LAB_URI']}': "
        f"Failed to list artifacts in s3://{bucket}/studies: The specified bucket does not exist"
    )
    moto_s3.client().create_bucket(Bucket=bucket)

    env = worker_env(PRUNETRACK_LAB_URI=settings["PRUNETRACK_LAB_URI"])  # no database, no S3 settings
    uri = subprocess.run(
        [sys.executable, "-m", "contract.profiles", "uri", "lab"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert uri == settings["PRUNETRACK_LAB_URI"]
    env.update({"MLFLOW_TRACKING_URI": uri, profiles.ENV_VAR: "lab"})
    params = (f"model={tiny_model_dir()}", "n_samples=4", "tasks=pydoc_ppl", "batch_size=4")
    study = mlflow_run(uri, "sensitivity", *params, cwd=tmp_path, options=("--experiment-name", "sensitivity/tiny"), env=env)
    assert study.returncode == 0, study.stderr[-3000:]

    keys = moto_s3.keys(bucket, "studies/")
    assert sum(k.endswith("/artifacts/sensitivity.json") for k in keys) == 1
    assert sum(k.endswith("/artifacts/importance.png") for k in keys) == 1
    assert sum(k.endswith("/artifacts/per_example/pydoc_ppl.json") for k in keys) == 5  # baseline + 4 blocks

    read_back = """
import json
from contract import tracking
client = tracking.connect()
exp = client.get_experiment_by_name("sensitivity/tiny")
parent, = client.search_runs([exp.experiment_id], "tags.`prunetrack.kind` = 'sensitivity'")
children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
importance = sorted(client.get_metric_history(parent.info.run_id, "importance"), key=lambda m: m.step)
report = tracking.load_json(client, parent.info.run_id, "sensitivity.json")
print(json.dumps({"status": parent.info.status, "num_blocks": parent.data.params["num_blocks"],
                  "children": sorted(r.data.tags["removed_blocks"] for r in children),
                  "importance": [m.value for m in importance], "report": report["importance_mean"],
                  "artifact_uri": parent.info.artifact_uri}))
"""
    other = subprocess.run(
        [sys.executable, "-c", read_back],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=worker_env(**{profiles.ENV_VAR: "lab", "PRUNETRACK_LAB_URI": uri}),
    )
    assert other.returncode == 0, other.stderr[-3000:]
    found = json.loads(other.stdout.strip().splitlines()[-1])
    assert found["status"] == "FINISHED" and found["num_blocks"] == "4"
    assert found["children"] == ["", "0", "1", "2", "3"]
    assert len(found["importance"]) == 4 and found["importance"] == pytest.approx(found["report"])
    assert found["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied: workers never see S3


@pytest.mark.service
def test_basic_auth_refuses_a_client_without_credentials(tmp_path, monkeypatch):
    pytest.importorskip("flask_wtf", reason="basic auth needs Flask-WTF (pip install 'mlflow[auth]')")
    port = free_port()
    profile = tmp_path / "shared.yaml"
    profile.write_text(
        f"tracking_uri: http://127.0.0.1:{port}\nserver:\n"
        f"  backend_store_uri: sqlite:///{tmp_path}/mlflow.db\n  artifacts_destination: {tmp_path}/artifacts\n"
        f"  host: 127.0.0.1\n  port: {port}\n  workers: 1\n"
        f"  auth:\n    database_uri: sqlite:///{tmp_path}/auth.db\n    admin_username: boss\n"
    )
    secrets = {"MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key", "MLFLOW_AUTH_ADMIN_PASSWORD": "a-Long-pass-1234"}
    cmd = [sys.executable, "-m", "contract.profiles", "serve", str(profile)]
    env = {**os.environ, **MLFLOW_SERVER_ENV, **secrets, "TMPDIR": str(tmp_path)}
    with server_process(cmd, f"http://127.0.0.1:{port}/health", env=env, cwd=str(ROOT)):
        for var, value in FAST_FAIL.items():
            monkeypatch.setenv(var, value)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(tracking.TrackingError) as info:
            tracking.connect(str(profile))
        assert str(info.value) == (
            f"tracking store 'http://127.0.0.1:{port}' refused the credentials (HTTP 401): "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of the server"
        )
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "boss")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
        with pytest.raises(tracking.TrackingError, match="refused the credentials"):
            tracking.connect(str(profile))
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
        client = tracking.connect(str(profile))
        run = client.create_run(tracking.experiment_id(client, "auth-check"))
        tracking.log_json(client, run.info.run_id, "ok.json", {"ok": True})
        assert tracking.load_json(client, run.info.run_id, "ok.json") == {"ok": True}
