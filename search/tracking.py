"""The contract with the MLflow tracking store: study runs, configuration runs, lookup by hash.

A configuration (model, revision, dtype, tasks with their data fingerprint, split, n_samples,
seed, removed blocks, scorer version) has a stable hash. Before evaluating, a FINISHED run
tagged with that hash is looked up in every experiment of the store and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import sys
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
    _check_local_store(uri)
    try:
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        with fast_requests():
            experiments = client.search_experiments(max_results=1)
    except Exception as err:  # unreachable server, bad URL, refused credentials, unusable file
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
            with fast_requests():
                get_artifact_repository(location, tracking_uri=uri).list_artifacts()
        except Exception as err:  # missing bucket, unreachable S3, no S3 credentials
            raise TrackingError(f"cannot reach the artifact storage {location!r} of {uri!r}: {_reason(err)}") from None
    return client


# How the start-up check talks to a server: one retry, 10 s per request, so that an unreachable or
# refusing store is reported within 30 s (MLflow's defaults retry for minutes).
FAST_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def fast_requests():
    """MLflow HTTP requests made inside fail fast (see FAST_REQUESTS); the environment is restored after."""
    saved = {k: os.environ.get(k) for k in FAST_REQUESTS}
    os.environ.update(FAST_REQUESTS)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_local_store(uri: str) -> None:
    """A `sqlite:///path` store must name a file in a folder (MLflow creates missing folders)."""
    if not uri.startswith("sqlite:"):
        return
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception:
        raise TrackingError(f"tracking URI {uri!r} is not a database URI; allowed: sqlite:///<path to a .db file>, "
                            "http(s)://host:port, or a profile") from None
    if not database or database == ":memory:":
        return
    path = Path(database).expanduser()
    if path.is_dir():
        raise TrackingError(f"tracking URI {uri!r} names the folder {str(path)!r}; allowed: sqlite:///<path to a .db file>")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise TrackingError(f"tracking URI {uri!r}: {str(folder)!r} is a file, not a folder; allowed: "
                                    "sqlite:///<path to a .db file in a folder>")
            return


def ui_hint(uri: str) -> str:
    """How to look at the runs of store `uri`: open the server, or start `mlflow ui` on a database."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')} in a browser"
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"


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
def study_run(client: MlflowClient, kind: str, experiment: str, params: dict, tags: dict | None = None,
              name: str | None = None):
    """The parent run of a study: the run `mlflow run` created (MLFLOW_RUN_ID), else a new one
    in `experiment`. Yields (run_id, experiment_id); ends FINISHED, or FAILED with the reason.

    The run is named `name`, else after its kind, model and key settings (`run_name`), also when
    `mlflow run` created it (unless it was given a name there: `mlflow run --run-name`). Params
    whose value is an empty string (a setting not given) are not logged."""
    name = name or run_name(kind, params)
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = client.get_run(run_id)
        exp_id = run.info.experiment_id
        name_run(client, run_id, name, run.info.run_name)
        _hint_experiment(client, exp_id, experiment)
    else:
        exp_id = experiment_id(client, experiment)
        run_id = client.create_run(exp_id, run_name=name).info.run_id
    existing = client.get_run(run_id).data.params
    new_params = {k: str(v) for k, v in params.items() if k not in existing and str(v) != ""}
    log(client, run_id, params=new_params, tags={KIND: kind, HOST: socket.gethostname(), PID: str(os.getpid()), **(tags or {})})
    close_dead_processes(client, exp_id)
    try:
        yield run_id, exp_id
    except BaseException as err:
        fail(client, run_id, err)
        close_dead_processes(client, exp_id)
        raise
    client.set_terminated(run_id, "FINISHED")
    close_dead_processes(client, exp_id)  # a dead worker's runs are closed by the survivors


# The default model's name (pruning.models.DEFAULT_MODEL; not imported: analysis never loads torch).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The settings a study's run name shows after model, tasks and sample size, per kind: (param, label).
NAME_SETTINGS = {
    "beam_search": (("beam_width", "width"), ("max_removed", "max_removed")),
    "prune": (("pruning_ratio", "ratio"),),
    "export": (("num_removed", "removed"), ("dest", "")),
    "correlation": (("study_name", ""), ("target", "")),
    "beam_summary": (("beam_search_run_id", "of"),),
    "study": (("study_name", ""),),
}
_NAME_LIMIT = 250


def model_label(model: str) -> str:
    """A model as a run name shows it: `default` is the default model's name; a hub id, folder or
    .gguf file its last part (`HuggingFaceTB/SmolLM2-1.7B` -> `SmolLM2-1.7B`)."""
    model = str(model).strip().rstrip("/")
    if model in ("", "default"):
        return DEFAULT_MODEL_NAME if model else ""
    return re.sub(r"\.gguf$", "", model.replace("\\", "/").rsplit("/", 1)[-1])


def run_name(kind: str, params: dict) -> str:
    """A study run's name: its kind, model, tasks, sample size, split (when not validation) and the
    key settings of its kind, e.g. `sensitivity SmolLM2-135M-Instruct piqa,arc_easy n=100`."""
    parts = [kind]
    if str(params.get("model", "")).strip():
        parts.append(model_label(params["model"]))
    tasks = str(params.get("tasks", "")).strip()
    if tasks:
        parts.append(tasks if len(tasks) <= 80 else tasks[:77] + "...")
    n = str(params.get("n_samples", "")).strip()
    if n:
        parts.append("n=all" if n == "0" else f"n={n}")
    split = str(params.get("split", "")).strip()
    if split and split != "validation":
        parts.append(split)
    for key, label in NAME_SETTINGS.get(kind, ()):
        value = str(params.get(key, "")).strip()
        if value:
            parts.append(f"{label}={value}" if label else value)
    return " ".join(parts)[:_NAME_LIMIT]


def name_run(client: MlflowClient, run_id: str, name: str, current: str | None = None) -> None:
    """Give run `run_id` (one `mlflow run` created) the name `name`, unless it has one the user gave
    (`mlflow run --run-name`); MLflow's made-up names (`bemused-fox-123`) are replaced."""
    if current is None:
        current = client.get_run(run_id).info.run_name
    if _generated_name(current):
        client.update_run(run_id, name=name)


def _generated_name(name: str | None) -> bool:
    """Whether a run name is one MLflow made up (`bemused-fox-123`), not one the user gave."""
    if not name:
        return True
    match = re.fullmatch(r"([a-z]+)-([a-z]+)-(\d+)", name)
    if not match:
        return False
    try:
        from mlflow.utils import name_utils

        predicates = {w.lower() for w in name_utils._GENERATOR_PREDICATES}
        nouns = {w.lower() for w in name_utils._GENERATOR_NOUNS}
    except (ImportError, AttributeError):  # MLflow moved its word lists: the pattern alone decides
        return True
    return match.group(1) in predicates and match.group(2) in nouns


def _hint_experiment(client: MlflowClient, exp_id: str, experiment: str) -> None:
    """Under `mlflow run` without an experiment: say how to file the study under its own."""
    try:
        name = client.get_experiment(exp_id).name
    except Exception:
        return
    if name == "Default" and experiment != "Default":
        print(f"note: mlflow run filed this study under experiment 'Default'; pass --experiment-name {experiment} "
              f"(or set MLFLOW_EXPERIMENT_NAME={experiment}) to file it under its own", file=sys.stderr)


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
        print(f"warning: cannot close the runs of dead processes: {_reason(err)}", file=sys.stderr)
    return closed


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
            kill(client, run.info.run_id, "process died before the run finished")
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
        tags={MLFLOW_PARENT_RUN_ID: parent_id, "config_hash": conf_hash, HOST: socket.gethostname(),
              PID: str(os.getpid()), **tags},
    )
    log(client, run.info.run_id, params=params)
    return run.info.run_id


def kill(client: MlflowClient, run_id: str, reason: str) -> None:
    """Record a run whose process stopped before it finished as KILLED, with `reason` in `prunetrack.error`."""
    client.set_tag(run_id, ERROR, reason)
    client.set_terminated(run_id, "KILLED")


def fail(client: MlflowClient, run_id: str, error: BaseException | str) -> None:
    """Record a run as FAILED with a one-line reason, or as KILLED when it was stopped (Ctrl-C, SIGTERM,
    exit). Best effort: a store that does not answer leaves a warning, never a second traceback."""
    try:
        client.set_tag(run_id, ERROR, error_tag(error))
        client.set_terminated(run_id, "KILLED" if stop_reason(error) else "FAILED")
    except Exception as err:
        print(f"warning: cannot record run {run_id} as ended: {_reason(err)}", file=sys.stderr)


def error_tag(error: BaseException | str) -> str:
    """The `prunetrack.error` value: `Type: first line of the message`, or why the run was stopped."""
    reason = stop_reason(error)
    if reason:
        return f"{type(error).__name__}: {reason}"
    text = str(error).strip()
    message = text.splitlines()[0] if text else type(error).__name__
    return f"{type(error).__name__ if isinstance(error, BaseException) else 'error'}: {message}"[:5000]


# --------------------------------------------------------------------------- command line, stops, one-line errors


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, mlflow run cancelling): the process stops as on Ctrl-C."""


class UsageError(ValueError):
    """A command-line argument that cannot be parsed."""


def stop_reason(error) -> str | None:
    """Why the process was stopped, for a run that ends KILLED; None for a failure."""
    if isinstance(error, Terminated):
        return "terminated (SIGTERM) before the run finished"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C) before the run finished"
    if isinstance(error, SystemExit):
        return f"the process exited (code {error.code}) before the run finished"
    return None


_ALLOWED = {"int": "an integer", "float": "a number", "_optional_int": "an integer or empty"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`UsageError`, no usage block) that name the value and what is
    allowed. An option named `storage` also accepts a profile (search.profiles.storage). `--help`
    shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        match = re.fullmatch(r"argument --?(\w+)(?:/\S+)?: invalid (\w+) value: (.*)", message)
        if match:
            name, kind, value = match.groups()
            raise UsageError(f"{name} {value} is not valid; allowed: {_ALLOWED.get(kind, f'a {kind} value')}")
        match = re.fullmatch(r"argument --?(\w+)(?:/\S+)?: invalid choice: (.*) \(choose from (.*)\)", message)
        if match:
            name, value, choices = match.groups()
            raise UsageError(f"{name} {value} is not valid; allowed: {choices}")
        match = re.fullmatch(r"argument --?(\w+)(?:/\S+)?: (.*)", message)
        if match:
            raise UsageError(f"{match.group(1)}: {match.group(2)}")
        raise UsageError(f"{message}; allowed: the options of {self.prog} --help")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if isinstance(getattr(namespace, "storage", None), str):
            try:
                namespace.storage = profiles.storage(namespace.storage)
            except profiles.ProfileError as err:
                raise UsageError(str(err)) from None
        return namespace, extra


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise Terminated()


def guarded(main, argv=None, user_errors: tuple = ()) -> int:
    """Run `main(argv)` as an entry point. A user error (`user_errors`, a bad argument, an unusable store
    or profile) becomes one line `error: ...` on stderr and exit code 2; Ctrl-C and SIGTERM end the runs
    in flight as KILLED with the reason (exit 130 / 143). Under `mlflow run`, the run it created ends
    FAILED (KILLED when stopped) with `prunetrack.error`, whatever ended the process."""
    previous = None
    if hasattr(signal, "SIGTERM") and threading_main():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(argv)
    except (*user_errors, UsageError, TrackingError, profiles.ProfileError) as err:
        print(f"error: {err}", file=sys.stderr)
        fail_launcher_run(err)
        return 2
    except KeyboardInterrupt as err:
        print(f"error: {stop_reason(err).split(' before')[0]}; the runs in flight are marked KILLED", file=sys.stderr)
        fail_launcher_run(err)
        return 143 if isinstance(err, Terminated) else 130
    except BaseException as err:  # a bug: the traceback stays, the run says why it failed
        if not (isinstance(err, SystemExit) and not err.code):
            fail_launcher_run(err)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def fail_launcher_run(error: BaseException) -> None:
    """End the run `mlflow run` created (MLFLOW_RUN_ID) FAILED (KILLED when stopped) with `prunetrack.error`,
    unless the study already ended it; best effort and fast (its store may be the thing that failed)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        with fast_requests():
            client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or None)
            run = client.get_run(run_id)
            if ERROR not in run.data.tags:
                client.set_tag(run_id, ERROR, error_tag(error))
            if run.info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED" if stop_reason(error) else "FAILED")
    except Exception as err:
        print(f"warning: cannot record run {run_id} of mlflow run as failed: {_reason(err)}", file=sys.stderr)
