"""The run `mlflow run` created (MLFLOW_RUN_ID): ended FAILED (KILLED when stopped) with the error, or
deleted and purged when it holds a password; what must wait until `mlflow run` has exited runs detached."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from contract.names import ERROR
from contract.stores import fast_requests, first_line
from contract.tracking import error_tag, process_alive, stop_reason

logger = logging.getLogger(__name__)


def fail_launcher_run(error: BaseException) -> None:
    """End the run `mlflow run` created (MLFLOW_RUN_ID) FAILED (KILLED when stopped) with `prunetrack.error`,
    unless the study already ended it; best effort and fast (its store may be the thing that failed)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        with fast_requests():
            client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or None)
            run = client.get_run(run_id)
            if ERROR not in run.data.tags:
                client.set_tag(run_id, ERROR, error_tag(error))
            if run.info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED" if stop_reason(error) else "FAILED")
            if stop_reason(error) and _parent_is_mlflow_run():
                _after_launcher(client.tracking_uri, run_id, "killed")  # mlflow run will write FAILED over KILLED
    except Exception as err:
        logger.warning(f"cannot record run {run_id} of mlflow run as failed: {first_line(err)}")


def forget_secret_launcher_run() -> str | None:
    """Under `mlflow run`, when the run it created holds a password in a param (a URL `user:password@host`):
    end it FAILED, then, once `mlflow run` has exited (it still writes the run's status), delete it and purge
    it for good where the store allows (`mlflow gc` on a database or file store). What is done, for the
    error line, else None."""
    from urllib.parse import urlsplit

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        with fast_requests():
            client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or None)
            params = client.get_run(run_id).data.params
            secret = sorted(k for k, v in params.items() if "://" in v and _password_of(urlsplit(v)))
            if not secret:
                return None
            client.set_tag(run_id, ERROR, f"param {secret[0]} held a password; run deleted and purged")
            client.set_terminated(run_id, "FAILED")
    except Exception as err:
        logger.warning(f"cannot check run {run_id} of mlflow run for a password: {first_line(err)}")
        return None
    said = f"mlflow run had recorded it in param {secret[0]} of run {run_id}, which is deleted"
    if client.tracking_uri.startswith(("http://", "https://", "databricks")):
        client.delete_run(run_id)
        return f"{said}; purge it for good on the server: mlflow gc --backend-store-uri <its store> --run-ids {run_id}"
    if not _parent_is_mlflow_run():
        client.delete_run(run_id)
        _after_launcher(client.tracking_uri, run_id, "purge", wait=False)
        return f"{said} and purged (mlflow gc)"
    _after_launcher(client.tracking_uri, run_id, "purge")
    return f"{said} and purged (mlflow gc) as soon as mlflow run exits"


def _password_of(url) -> str | None:
    try:
        return url.password
    except ValueError:  # not a URL after all
        return None


def _parent_is_mlflow_run() -> bool:
    """Whether this process's parent is a live `mlflow run` (it ran our command with `bash -c`, which execs)."""
    try:
        command = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:  # no /proc: assume it is
        return process_alive(socket.gethostname(), os.getppid())
    return b"mlflow" in b" ".join(command) and b"run" in command


def _after_launcher(store: str, run_id: str, action: str, wait: bool = True) -> None:
    """Have a detached process do `action` to run `run_id` once `mlflow run` (this process's parent) has
    exited: `mlflow run` ends the run it created FAILED after its child exits, whatever the child recorded."""
    subprocess.Popen(
        [sys.executable, "-c", "import sys; from contract.launcher import after_launcher; after_launcher(*sys.argv[1:])"]
        + [str(os.getppid()) if wait else "", store, run_id, action],
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def after_launcher(launcher_pid: str, store: str, run_id: str, action: str, wait_s: float = 120) -> None:
    """Once process `launcher_pid` (if any) has exited (at most `wait_s` later), do `action` to run `run_id` of `store`:
    `killed`: end it KILLED again (`mlflow run` overwrote it FAILED); `purge`: delete it and purge it for good
    (`mlflow gc` removes its params, tags, metrics and artifacts)."""
    from mlflow.tracking import MlflowClient

    deadline = time.monotonic() + wait_s
    while launcher_pid and process_alive(socket.gethostname(), launcher_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    client = MlflowClient(store)
    if action == "killed":
        client.set_terminated(run_id, "KILLED")
        return
    if client.get_run(run_id).info.lifecycle_stage != "deleted":
        client.delete_run(run_id)
    subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", store, "--run-ids", run_id], check=False)
