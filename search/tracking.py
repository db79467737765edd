"""The contract with the MLflow tracking store: study runs, configuration runs, lookup by hash.

A configuration (model, revision, dtype, tasks with their data fingerprint, split, n_samples,
seed, removed blocks, scorer version) has a stable hash. Before evaluating, a FINISHED run
tagged with that hash is looked up in every experiment of the store and reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from search import profiles

KIND = "prunetrack.kind"
ERROR = "prunetrack.error"
HOST, PID = "prunetrack.host", "prunetrack.pid"
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used."""


def connect(tracking_uri: str | None = None) -> MlflowClient:
    """A client for the store named by `tracking_uri` (a URI or a profile), else $PRUNETRACK_PROFILE,
    $MLFLOW_TRACKING_URI, MLflow's default. Checked before any compute: the server answers and accepts
    the credentials, its artifact storage answers, and it holds the run `mlflow run` started."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        uri, source = profiles.resolve(tracking_uri)
    except profiles.ProfileError as err:
        raise TrackingError(str(err)) from None
    launcher = os.environ.get("MLFLOW_TRACKING_URI", "")
    if os.environ.get("MLFLOW_RUN_ID") and launcher and launcher.rstrip("/") != uri.rstrip("/"):
        raise TrackingError(f"mlflow run started run {os.environ['MLFLOW_RUN_ID']} in {launcher!r} but {source} names "
                            f"{uri!r}: give mlflow run the same store (MLFLOW_TRACKING_URI={uri} mlflow run ...)")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    try:
        experiments = client.search_experiments(max_results=1)
    except Exception as err:  # unreachable server, bad URL, refused credentials
        status = _http_status(err)
        if status == 401:
            raise TrackingError(f"tracking store {uri!r} refused the credentials (HTTP 401): set "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of the server") from None
        if status == 403:  # no permission, or a Host header the server does not allow
            raise TrackingError(f"tracking store {uri!r} refused the request (HTTP 403): {_reason(err)}") from None
        raise TrackingError(f"cannot reach tracking store {uri!r}: {_reason(err)}") from None
    if experiments:  # every experiment's artifacts live in the store's artifact storage
        location = experiments[0].artifact_location
        try:
            get_artifact_repository(location, tracking_uri=uri).list_artifacts()
        except Exception as err:  # missing bucket, unreachable S3, no S3 credentials
            raise TrackingError(f"cannot reach the artifact storage {location!r} of {uri!r}: {_reason(err)}") from None
    return client


def _http_status(err: Exception) -> int | None:
    """The HTTP status of a failed request: requests' errors carry the response, MLflow's the code."""
    response = getattr(err, "response", None)
    if response is not None:
        return response.status_code
    return err.get_http_status_code() if hasattr(err, "get_http_status_code") else None


def _reason(err: Exception) -> str:
    """One line saying why a request failed: the server's own message where it sent one."""
    try:
        text = err.response.json()["message"]
    except Exception:
        text = str(err)
    return (text.strip().splitlines()[0] if text.strip() else type(err).__name__)[:300]


def config_hash(identity: dict) -> str:
    """Stable hash of a configuration's identity (canonical JSON, SHA-256, 16 hex digits)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of experiment `name`, created when missing (safe against a concurrent creator)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def study_run(client: MlflowClient, kind: str, experiment: str, params: dict, tags: dict | None = None):
    """The parent run of a study: the run `mlflow run` created (MLFLOW_RUN_ID), else a new one
    in `experiment`. Yields (run_id, experiment_id); ends FINISHED, or FAILED with the reason."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = client.get_run(run_id)
        exp_id = run.info.experiment_id
    else:
        exp_id = experiment_id(client, experiment)
        run_id = client.create_run(exp_id, run_name=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}").info.run_id
    existing = client.get_run(run_id).data.params
    new_params = {k: str(v) for k, v in params.items() if k not in existing}
    log(client, run_id, params=new_params, tags={KIND: kind, HOST: socket.gethostname(), PID: str(os.getpid()), **(tags or {})})
    try:
        yield run_id, exp_id
    except BaseException as err:
        fail(client, run_id, err)
        raise
    client.set_terminated(run_id, "FINISHED")


def log(client: MlflowClient, run_id: str, *, params: dict | None = None, metrics: dict | None = None,
        tags: dict | None = None, step: int = 0) -> None:
    """Log params, metrics and tags in batches."""
    now = int(time.time() * 1000)
    items = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    items += [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    items += [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    for start in range(0, len(items), _BATCH):
        chunk = items[start : start + _BATCH]
        client.log_batch(
            run_id,
            metrics=[i for i in chunk if isinstance(i, Metric)],
            params=[i for i in chunk if isinstance(i, Param)],
            tags=[i for i in chunk if isinstance(i, RunTag)],
        )


def log_series(client: MlflowClient, run_id: str, name: str, values) -> None:
    """Log a vector as metric `name` with step = index."""
    now = int(time.time() * 1000)
    metrics = [Metric(name, float(v), now, i) for i, v in enumerate(values)]
    for start in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _BATCH])


def log_json(client: MlflowClient, run_id: str, name: str, payload, artifact_path: str | None = None) -> None:
    """Write `payload` as JSON artifact `name`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(payload, indent=1, sort_keys=True))
        client.log_artifact(run_id, str(path), artifact_path)


def load_json(client: MlflowClient, run_id: str, name: str):
    """Read JSON artifact `name` of a run."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text())


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(max_results=50000)]


def find_runs(client: MlflowClient, conf_hash: str, status: str | None = None) -> list:
    """Runs tagged with `conf_hash` in any experiment, optionally of one status."""
    query = f"tags.config_hash = '{conf_hash}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return client.search_runs(_all_experiment_ids(client), query, order_by=["attributes.start_time ASC"])


def process_alive(host: str, pid) -> bool:
    """Whether process `pid` on `host` may still run (always assumed for another host)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def close_dead_runs(client: MlflowClient, conf_hash: str) -> int:
    """Mark RUNNING runs of `conf_hash` whose process on this machine is gone as KILLED."""
    closed = 0
    for run in find_runs(client, conf_hash, "RUNNING"):
        if not process_alive(run.data.tags.get(HOST), run.data.tags.get(PID, "0")):
            client.set_tag(run.info.run_id, ERROR, "process died before the run finished")
            client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    return closed


@dataclass
class ChildRun:
    """A configuration's run, found or created."""

    run_id: str
    metrics: dict[str, float]
    reused: bool


def open_child(client: MlflowClient, exp_id: str, parent_id: str, conf_hash: str, name: str, tags: dict, params: dict) -> str:
    """Create a configuration run under `parent_id`, tagged with its hash and owner process."""
    run = client.create_run(
        exp_id,
        run_name=name,
        tags={MLFLOW_PARENT_RUN_ID: parent_id, "config_hash": conf_hash, HOST: socket.gethostname(), PID: str(os.getpid()), **tags},
    )
    log(client, run.info.run_id, params=params)
    return run.info.run_id


def fail(client: MlflowClient, run_id: str, error: BaseException | str) -> None:
    """Record a run as FAILED with a one-line reason."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    client.set_tag(run_id, ERROR, f"{type(error).__name__ if isinstance(error, BaseException) else 'error'}: {message}"[:5000])
    client.set_terminated(run_id, "FAILED")
