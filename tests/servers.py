"""Real services for tests: a moto S3 server, a fresh PostgreSQL database, an MLflow tracking server.

Each service is a context manager (usable anywhere) with a pytest fixture on top. A service that is
not available here makes the test skip with the reason; one that is available but fails to start
fails the test with the tail of its log. Servers run as subprocesses on free loopback ports and are
stopped (process group terminated) when the context exits.

In a test module:

    from servers import lab_server, mlflow_server, moto_s3, postgres_db  # noqa: F401  (fixtures)

    def test_reads_back(lab_server):
        client = MlflowClient(lab_server.url)        # PostgreSQL store, artifacts proxied to S3
        ...
        lab_server.keys()                            # S3 object keys of the artifacts logged

    def test_other(moto_s3, postgres_db):            # the parts, for a server of one's own
        bucket = moto_s3.bucket("exports")           # a new bucket on the moto server
        with mlflow_server(postgres_db, f"s3://{bucket}/a", env=moto_s3.env) as url: ...

Mark a test that uses them `@pytest.mark.service` (pyproject.toml), so that `-m "not service"` leaves it out.

Other helpers: `free_port()`, `server_process(cmd, health_url, env)` (any server command),
`moto_s3_server()` and `postgres_database()` (the context managers behind the fixtures).

Scopes: `postgres_db` is new per test, `lab_server` per test module, `moto_s3` per session; pytest
keeps one instance per module that imports a fixture, so import `moto_s3` in tests/conftest.py to
share a single moto server across modules. PostgreSQL is found at $PRUNETRACK_TEST_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/postgres, a role allowed to create databases).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

ADMIN_POSTGRES = os.environ.get("PRUNETRACK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
START_TIMEOUT = 180  # seconds; the machine may be shared and slow
# For any `mlflow server` a test starts: no GenAI job runner process (prunetrack never uses it).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(cmd: list[str], health_url: str, env: dict | None = None, cwd: str | None = None):
    """Run `cmd` in its own process group until `health_url` answers (any HTTP status), yield the
    Popen, then terminate the group. The process's output goes to a log whose tail is shown when
    it dies or never answers."""
    with tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        _wait_until_up(proc, health_url, log.name)
        yield proc
    finally:
        _stop(proc)
        os.unlink(log.name)


def _wait_until_up(proc: subprocess.Popen, url: str, log_path: str) -> None:
    # The one wait loop of the test servers. Hand-written: it polls a URL and the process together (a
    # server that exits fails at once, with its log), which a retry library's decorator does not express.
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server {proc.args[:4]} exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"server {proc.args[:4]} did not answer {url} within {START_TIMEOUT}s:\n{_tail(log_path)}")


def _tail(path: str, lines: int = 40) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(3)  # uvicorn waits for the keep-alive connections of clients still alive
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --------------------------------------------------------------------------- S3 (moto)


@dataclass
class S3Server:
    """A moto S3 server: `endpoint_url`, and `env`, the variables a process needs to use it
    (MLFLOW_S3_ENDPOINT_URL, fake AWS credentials and region)."""

    endpoint_url: str
    env: dict = field(default_factory=dict)

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def bucket(self, prefix: str = "prunetrack") -> str:
        """Create a bucket with a unique name starting with `prefix`; its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@contextlib.contextmanager
def moto_s3_server():
    """A moto S3 server (`python -m moto.server`) on a free loopback port."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], f"{url}/moto-api/"):
        yield S3Server(
            url,
            {
                "MLFLOW_S3_ENDPOINT_URL": url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
        )


@pytest.fixture(scope="session")
def moto_s3():
    """One moto S3 server for the test session (make a bucket per test with `moto_s3.bucket()`)."""
    with moto_s3_server() as server:
        yield server


# --------------------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def postgres_database(prefix: str = "prunetrack_test"):
    """A new, empty PostgreSQL database; yields its SQLAlchemy URI (postgresql+psycopg2://...) and
    drops it afterwards."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed")
    try:
        admin = psycopg2.connect(ADMIN_POSTGRES, connect_timeout=5)
    except psycopg2.OperationalError as err:
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_POSTGRES} ($PRUNETRACK_TEST_POSTGRES): {str(err).strip()}")
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3: name the installed driver
        uri = make_url(ADMIN_POSTGRES).set(drivername="postgresql+psycopg2", database=name)
        yield uri.render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def postgres_db():
    """URI of a new PostgreSQL database, dropped after the test."""
    with postgres_database() as uri:
        yield uri


# --------------------------------------------------------------------------- MLflow server


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str, artifacts_destination: str, env: dict | None = None, extra: tuple = (), workers: int = 1
):
    """A real `mlflow server` subprocess on a free loopback port, artifacts proxied to
    `artifacts_destination`; yields its URL. `env` is added to this process's environment for the
    server only (for example `moto_s3.env`); `extra`: more `mlflow server` options."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        *extra,
    ]
    with server_process(cmd, f"{url}/health", env={**os.environ, **MLFLOW_SERVER_ENV, **(env or {})}):
        yield url


@dataclass
class LabServer:
    """An MLflow server on PostgreSQL with artifacts proxied to `s3://{bucket}/{prefix}`."""

    url: str
    backend_store_uri: str
    bucket: str
    prefix: str
    s3: S3Server

    def keys(self) -> list[str]:
        """Object keys of every artifact stored through this server."""
        return self.s3.keys(self.bucket, self.prefix)


@pytest.fixture(scope="module")
def lab_server(moto_s3):
    """A lab-like tracking server for one test module: PostgreSQL store, artifacts in moto S3.
    Clients need no S3 credentials: point MLFLOW_TRACKING_URI (or MlflowClient) at `.url`."""
    bucket = moto_s3.bucket()
    with postgres_database() as db, mlflow_server(db, f"s3://{bucket}/mlartifacts", moto_s3.env, workers=2) as url:
        yield LabServer(url, db, bucket, "mlartifacts", moto_s3)
