"""The contract with the MLflow tracking store: study runs, configuration runs, lookup by hash.

A configuration (model, revision, dtype, tasks with their data fingerprint, split, n_samples,
seed, removed blocks, scorer version) has a stable hash. Before evaluating, a FINISHED run
tagged with that hash is looked up in every experiment of the store and reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlflow takes over a second to import: loaded where used, so that an entry point's --help is quick
    from mlflow.tracking import MlflowClient

from contract import names, profiles, schema, stores
from contract.names import CONFIG_HASH, ERROR, HOST, KIND, PID
from contract.naming import name_run, run_name
from contract.stores import TrackingError, first_line

logger = logging.getLogger(__name__)

MAX_METRICS, MAX_PARAMS_TAGS = 1000, 100  # what MLflow accepts in one log_batch call


def connect(tracking_uri: str | None = None) -> MlflowClient:
    """A client for the store named by `tracking_uri` (a URI or a profile), else $PRUNETRACK_PROFILE,
    $MLFLOW_TRACKING_URI, MLflow's default. Checked before any compute: the server answers and accepts
    the credentials, its artifact storage answers, and it holds the run `mlflow run` started."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    try:
        uri, source = profiles.resolve(tracking_uri)
    except profiles.ProfileError as err:
        raise TrackingError(str(err)) from None
    launcher = os.environ.get("MLFLOW_TRACKING_URI", "")
    if os.environ.get("MLFLOW_RUN_ID") and launcher and launcher.rstrip("/") != uri.rstrip("/"):
        raise TrackingError(
            f"mlflow run started run {os.environ['MLFLOW_RUN_ID']} in {launcher!r} but {source} names "
            f"{uri!r}: give mlflow run the same store (MLFLOW_TRACKING_URI={uri} mlflow run ...)"
        )
    stores.check_local_store(uri)
    database = stores.database_url(uri)
    with contextlib.ExitStack() as held:
        if database:  # workers starting together on a new store: one creates the schema, the others wait
            try:
                held.enter_context(schema.creation_lock(database))
            except Exception as err:  # the database server does not answer, or refuses the login
                raise TrackingError(f"cannot reach tracking store {stores.shown(uri)!r}: {first_line(err)}") from None
        try:
            mlflow.set_tracking_uri(uri)
            client = MlflowClient(uri)
            with stores.fast_requests():
                experiments = client.search_experiments(max_results=1)
        except Exception as err:  # unreachable server, bad URL, refused credentials, unusable file
            if database:  # the database answered the lock: it is there, and MLflow cannot use it
                raise TrackingError(
                    f"tracking store {stores.shown(uri)!r} is a database MLflow cannot use ({first_line(err)}); "
                    f"{schema.repair_hint(database, stores.shown(uri))}"
                ) from None
            status = stores.http_status(err)
            if status == 401:
                raise TrackingError(
                    f"tracking store {uri!r} refused the credentials (HTTP 401): set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of the server"
                ) from None
            if status == 403:  # no permission, or a Host header the server does not allow
                raise TrackingError(f"tracking store {uri!r} refused the request (HTTP 403): {first_line(err)}") from None
            raise TrackingError(f"cannot reach tracking store {uri!r}: {first_line(err)}") from None
    if experiments:  # every experiment's artifacts live in the store's artifact storage
        location = experiments[0].artifact_location
        try:
            with stores.fast_requests():
                get_artifact_repository(location, tracking_uri=uri).list_artifacts()
        except Exception as err:  # missing bucket, unreachable S3, no S3 credentials
            raise TrackingError(f"cannot reach the artifact storage {location!r} of {uri!r}: {first_line(err)}") from None
    return client


def ui_hint(uri: str) -> str:
    """How to look at the runs of store `uri`: open the server, or start `mlflow ui` on a database."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')} in a browser"
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"


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
def study_run(client: MlflowClient, kind: str, experiment: str, params: dict, tags: dict | None = None, name: str | None = None):
    """The parent run of a study (`open_run`), with the runs of dead processes in its experiment closed.
    Yields (run_id, experiment_id); ends FINISHED, or FAILED with the reason."""
    run_id, exp_id = open_run(client, kind, experiment, params, tags, name)
    close_dead_processes(client, exp_id)
    try:
        yield run_id, exp_id
    except BaseException as err:
        fail(client, run_id, err)
        close_dead_processes(client, exp_id)
        raise
    client.set_terminated(run_id, "FINISHED")
    close_dead_processes(client, exp_id)  # a dead worker's runs are closed by the survivors


def open_run(
    client: MlflowClient, kind: str, experiment: str, params: dict, tags: dict | None = None, name: str | None = None
) -> tuple[str, str]:
    """Open the parent run of a study: the run `mlflow run` created (MLFLOW_RUN_ID), else a new one in
    `experiment`, tagged with its kind, its process and `tags`; returns (run_id, experiment_id).

    The run is named `name`, else after its kind, model and key settings (`run_name`), also when
    `mlflow run` created it (unless it was given a name there: `mlflow run --run-name`). Params the
    run already holds, and those whose value is an empty string (a setting not given), are not logged."""
    name = name or run_name(kind, params)
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = client.get_run(run_id)
        exp_id, existing = run.info.experiment_id, run.data.params
        name_run(client, run_id, name, run.info.run_name)
        _hint_experiment(client, exp_id, experiment)
    else:
        exp_id, existing = experiment_id(client, experiment), {}
        run_id = client.create_run(exp_id, run_name=name).info.run_id
    in_flight(client, exp_id)
    new_params = {k: v for k, v in params.items() if k not in existing and str(v) != ""}
    log(client, run_id, params=new_params, tags={KIND: kind, HOST: socket.gethostname(), PID: str(os.getpid()), **(tags or {})})
    return run_id, exp_id


def _hint_experiment(client: MlflowClient, exp_id: str, experiment: str) -> None:
    """Under `mlflow run` without an experiment: say how to file the study under its own."""
    try:
        name = client.get_experiment(exp_id).name
    except Exception:
        return
    if name == "Default" and experiment != "Default":
        logger.warning(
            f"mlflow run filed this study under experiment 'Default'; pass --experiment-name {experiment} "
            f"(or set MLFLOW_EXPERIMENT_NAME={experiment}) to file it under its own"
        )


def close_dead_processes(client: MlflowClient, exp_id: str) -> int:
    """Mark the RUNNING runs of experiment `exp_id` whose process on this machine is gone (killed with
    SIGKILL, out of memory, the machine rebooted) as KILLED; best effort. How many were closed."""
    host, closed = socket.gethostname(), 0
    try:
        query = f"attributes.status = 'RUNNING' and tags.`{HOST}` = '{host}'"
        for run in client.search_runs([exp_id], query, max_results=5000):
            pid = run.data.tags.get(PID, "")
            if pid and not process_alive(host, pid):
                kill(client, run.info.run_id, f"process {host}:{pid} died before the run finished")
                closed += 1
    except Exception as err:  # the store is not answering: the next start closes them
        logger.warning(f"cannot close the runs of dead processes: {first_line(err)}")
    return closed


def log(
    client: MlflowClient,
    run_id: str,
    *,
    params: dict | None = None,
    metrics: dict | None = None,
    tags: dict | None = None,
    step: int = 0,
) -> None:
    """Log params, metrics and tags in as few calls as MLflow allows (MAX_METRICS, MAX_PARAMS_TAGS per call)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    params_tags = [Param(k, _text(v)[:6000]) for k, v in (params or {}).items()]
    params_tags += [RunTag(k, _text(v)) for k, v in (tags or {}).items()]
    _log_batches(client, run_id, [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()], params_tags)


def _text(value) -> str:
    """A param or tag value as the command line writes it: booleans `true`/`false`, as `mlflow run` logs them."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def log_series(client: MlflowClient, run_id: str, name: str, values) -> None:
    """Log a vector as metric `name` with step = index."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _log_batches(client, run_id, [Metric(name, float(v), now, i) for i, v in enumerate(values)], [])


def _log_batches(client: MlflowClient, run_id: str, metrics: list, params_tags: list) -> None:
    from mlflow.entities import Param, RunTag

    calls = max(math.ceil(len(metrics) / MAX_METRICS), math.ceil(len(params_tags) / MAX_PARAMS_TAGS))
    for i in range(calls):
        some = params_tags[i * MAX_PARAMS_TAGS : (i + 1) * MAX_PARAMS_TAGS]
        client.log_batch(
            run_id,
            metrics=metrics[i * MAX_METRICS : (i + 1) * MAX_METRICS],
            params=[x for x in some if isinstance(x, Param)],
            tags=[x for x in some if isinstance(x, RunTag)],
        )


def log_json(client: MlflowClient, run_id: str, name: str, payload, artifact_path: str | None = None) -> None:
    """Write `payload` as JSON artifact `name`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(payload, indent=1, sort_keys=True))
        client.log_artifact(run_id, str(path), artifact_path)


def log_per_example(client: MlflowClient, run_id: str, scores) -> None:
    """Write each task score's per-example results (pruning.evaluate.TaskScore) as `per_example/<task>.json`."""
    for s in scores:
        log_json(client, run_id, f"{s.task}.json", {"task": s.task, "kind": s.kind, **s.per_example}, "per_example")


def describe(client: MlflowClient, run_id: str, markdown: str) -> None:
    """Set a run's description (`mlflow.note.content`, shown atop its page in the MLflow UI), cut to
    what MLflow stores in a tag (8,000 characters) with a note where the rest is."""
    if len(markdown) > 8000:
        markdown = markdown[:7900] + "\n\n_(cut here: the whole report is in the run's artifacts)_\n"
    client.set_tag(run_id, names.DESCRIPTION, markdown)


def load_json(client: MlflowClient, run_id: str, name: str):
    """Read JSON artifact `name` of a run."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text())


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(max_results=50000)]


def find_runs(client: MlflowClient, conf_hash: str, status: str | None = None) -> list:
    """Runs tagged with `conf_hash` in any experiment, optionally of one status."""
    query = f"tags.{CONFIG_HASH} = '{conf_hash}'"
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
            kill(client, run.info.run_id, "process died before the run finished")
            closed += 1
    return closed


def open_child(client: MlflowClient, exp_id: str, parent_id: str, conf_hash: str, name: str, tags: dict, params: dict) -> str:
    """Create a configuration run under `parent_id`, tagged with its hash and owner process."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run = client.create_run(
        exp_id,
        run_name=name,
        tags={MLFLOW_PARENT_RUN_ID: parent_id, CONFIG_HASH: conf_hash, HOST: socket.gethostname(), PID: str(os.getpid()), **tags},
    )
    in_flight(client, exp_id)
    log(client, run.info.run_id, params=params)
    return run.info.run_id


def kill(client: MlflowClient, run_id: str, reason: str) -> None:
    """Record a run whose process stopped before it finished as KILLED, with `reason` in `prunetrack.error`."""
    client.set_tag(run_id, ERROR, reason)
    client.set_terminated(run_id, "KILLED")


def fail(client: MlflowClient, run_id: str, error: BaseException | str) -> None:
    """Record a run as FAILED with a one-line reason, or as KILLED when it was stopped (Ctrl-C, SIGTERM,
    exit); a run stopped by a signal is left to `stop_in_flight`. Best effort: a store that does not
    answer leaves a warning, never a second traceback."""
    if defer_stops and stop_reason(error):
        return
    try:
        client.set_tag(run_id, ERROR, error_tag(error))
        client.set_terminated(run_id, "KILLED" if stop_reason(error) else "FAILED")
    except Exception as err:
        logger.warning(f"cannot record run {run_id} as ended: {first_line(err)}")


def error_tag(error: BaseException | str) -> str:
    """The `prunetrack.error` value: `Type: first line of the message`, or why the run was stopped."""
    reason = stop_reason(error)
    if reason:
        return f"{type(error).__name__}: {reason}"
    text = str(error).strip()
    message = text.splitlines()[0] if text else type(error).__name__
    return f"{type(error).__name__ if isinstance(error, BaseException) else 'error'}: {message}"[:5000]


# --------------------------------------------------------------------------- stops


# Where this process opens runs (tracking URI -> client and experiment ids): a stop ends its RUNNING runs
# there KILLED in one batch. `defer_stops` is set when a signal stops the process (contract.cli), so that
# the clean-up on the way out leaves its runs to that batch.
_OPENED: dict[str, tuple[MlflowClient, set[str]]] = {}
defer_stops = False


def in_flight(client: MlflowClient, exp_id: str) -> None:
    """Note that this process opens runs in experiment `exp_id`: a stop ends them KILLED (`stop_in_flight`)."""
    _OPENED.setdefault(client.tracking_uri, (client, set()))[1].add(exp_id)


def forget_in_flight() -> None:
    """Forget where this process opened runs: its entry point has returned (contract.cli.run_main)."""
    _OPENED.clear()


def stop_in_flight(error: BaseException) -> str:
    """End every RUNNING run of this process (tagged with its host and pid) KILLED with why it was stopped,
    in one batch: configuration runs first, the study's run last. What was done, as the stop message says it."""
    global defer_stops
    query = f"attributes.status = 'RUNNING' and tags.`{PID}` = '{os.getpid()}' and tags.`{HOST}` = '{socket.gethostname()}'"
    failed = []
    for client, experiments in _OPENED.values():
        try:
            running = client.search_runs(sorted(experiments), query, max_results=50000)
            for run in sorted(running, key=lambda r: "mlflow.parentRunId" not in r.data.tags):
                kill(client, run.info.run_id, error_tag(error))
        except Exception as err:  # the store does not answer: the next start closes them
            failed.append(first_line(err))
    defer_stops = False
    forget_in_flight()
    if failed:
        return f"runs in flight could not all be marked KILLED ({failed[0]}); the next start closes them"
    return "the runs in flight are marked KILLED"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, mlflow run cancelling): the process stops as on Ctrl-C."""


def stop_reason(error) -> str | None:
    """Why the process was stopped, for a run that ends KILLED; None for a failure."""
    if isinstance(error, Terminated):
        return "terminated (SIGTERM) before the run finished"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C) before the run finished"
    if isinstance(error, SystemExit):
        return f"the process exited (code {error.code}) before the run finished"
    return None
