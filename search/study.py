"""Optuna-driven Taylor parameter studies: a grid or TPE over the `prune` settings, every trial a tracked run.

A study config (`mlruns_config/studies/<name>.yaml`) holds fixed pruning options (any PruneSettings
field), the search space, the objective metric(s), `n_trials` and the Optuna storage. Starting the
same command again resumes the study; starting it N times at once makes N workers share it:

- The first worker creates the Optuna study (atomic on the storage) and the study's MLflow parent
  run, enqueues every grid point once as a WAITING trial, then writes the study user attr
  `prunetrack` (parent run id, tracking URI, config), which tells the other workers it is ready.
- In a grid study workers only run enqueued trials; taking one is atomic on RDB storage, so no
  point is evaluated twice. A trial that finds the queue empty (another worker took the last
  point between look and take) ends PRUNED without evaluating anything.
- Workers coordinate as the beam search's do, through the claims table in the same database
  (search.work.Claims): a worker claims each trial it runs. A RUNNING trial whose claim's owner is
  gone (same machine: its process exited; another machine: no heartbeat for STALE_S seconds) is
  failed by the next worker that looks, at once; its MLflow run is marked KILLED and its point
  enqueued again (`max_retry`). A trial stopped by Ctrl-C is marked the same way by its own worker. Workers wait for the running
  trials of others before they stop, so a survivor redoes a dead worker's trial.
- Each trial is a `prunetrack.kind=prune` child run of the parent run, in the parent's experiment.
  Under `mlflow run`, the first worker's run is the parent; a later worker's run is tagged
  `prunetrack.kind=study_worker` and made a child of the parent.
- When a worker finds nothing left to do, the parent run gets `search_results.csv` and Optuna's plots.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import sqlalchemy as sa
import yaml
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pruning import taylor
from pruning.models import ModelError
from pruning.tasks import METRICS, parse_task_list
from search import profiles, tracking
from search.cli import USER_ERRORS, SearchError, run_main
from search.configs import error_line
from search.prune import PruneSettings, prune_and_evaluate
from search.work import POLL_S, RUNNING, STALE_S, Claims, free_memory, storage_url

STUDIES_DIR = Path(__file__).resolve().parents[1] / "mlruns_config" / "studies"
KIND, WORKER_KIND, TRIAL_KIND = "study", "study_worker", "prune"
STUDY_TAG, TRIAL_TAG, STORAGE_TAG = "optuna.study_name", "optuna.trial_number", "optuna.storage"
SETUP_ATTR = "prunetrack"  # study user attr the first worker writes last: parent run, tracking URI, config
RESULTS = "search_results.csv"
DEFAULT_STORAGE = "sqlite:///optuna.db"
READY_TIMEOUT_S = 60  # how long a worker waits for the first worker to set a new study up
STUDY_KEYS = ("study_name", "storage", "sampler", "sampler_seed", "search_space", "objective", "direction",
              "n_trials", "max_retry")
PARAM_COLUMNS = ("taylor_seq_len", "taylor_num_samples", "pruning_ratio")
GRAD_COLUMNS = tuple(taylor.gradient_summary([taylor.GradStats(1.0, 1.0, 1.0, 1.0)]))  # names prune runs log
SUMMARY_COLUMNS = ("acc_mean", "headline_mean", "ppl", *GRAD_COLUMNS, "extreme_pruning_layers", "n_params_before",
                   "n_params_after", "pruning_rate")
RUN_METRICS = ("taylor_seconds", "eval_seconds", "pruned_fraction", "n_params_before", "n_params_after",
               "pruning_rate", "extreme_pruning_layers")


# --------------------------------------------------------------------------- config


@dataclass
class StudySpec:
    """A study config: fixed prune settings, search space, objective(s), storage and worker options."""

    name: str
    storage: str
    settings: PruneSettings
    space: dict  # parameter -> list of values (grid points / categorical) or {low, high[, step][, log]}
    sampler: str  # grid or tpe
    objectives: list[str]
    directions: list[str]
    n_trials: int
    max_retry: int = 3
    sampler_seed: int | None = None

    def identity(self) -> dict:
        """What every worker of one study must agree on (JSON types)."""
        return json.loads(json.dumps({"settings": asdict(self.settings), "space": self.space, "sampler": self.sampler,
                                      "objectives": self.objectives, "directions": self.directions}))

    def grid(self) -> list[dict]:
        """Every grid point, in config order (the last parameter varies fastest)."""
        return [dict(zip(self.space, values)) for values in itertools.product(*self.space.values())]

    def suggest(self, trial: optuna.Trial) -> dict:
        """This trial's parameters: the enqueued grid point, or TPE's suggestion."""
        params = {}
        for name, domain in self.space.items():
            if isinstance(domain, list):
                params[name] = trial.suggest_categorical(name, domain)
            elif _field_type(name) is int:
                params[name] = trial.suggest_int(name, domain["low"], domain["high"], step=domain.get("step", 1),
                                                 log=domain.get("log", False))
            else:
                params[name] = trial.suggest_float(name, domain["low"], domain["high"], step=domain.get("step"),
                                                   log=domain.get("log", False))
        return params

    def sampler_object(self) -> optuna.samplers.BaseSampler:
        if self.sampler == "grid":
            return optuna.samplers.GridSampler(self.space, seed=self.sampler_seed)
        return optuna.samplers.TPESampler(seed=self.sampler_seed)


def _field_type(name: str) -> type:
    return type(getattr(PruneSettings(), name))


def config_path(ref: str) -> Path:
    """A config named in mlruns_config/studies (`quick`) or a path to a .yaml file."""
    path = Path(ref) if ref.endswith((".yaml", ".yml")) else STUDIES_DIR / f"{ref}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in STUDIES_DIR.glob("*.yaml")))
        raise SearchError(f"study config {ref!r} not found; available: {names}, or a path to a .yaml file")
    return path


def load_spec(ref: str, storage: str = "", study_name: str = "", n_trials: int | None = None) -> StudySpec:
    """Read and check a study config; `storage`, `study_name` and `n_trials` override its values."""
    path = config_path(ref)
    where = f"config {path.name}"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SearchError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise SearchError(f"{where} must be a mapping of keys to values")
    prune_keys = asdict(PruneSettings())
    for key in data:
        if key not in prune_keys and key not in STUDY_KEYS:
            raise SearchError(f"{where}: unknown key {key!r}; allowed: {', '.join(STUDY_KEYS)}, "
                              f"or a prune option ({', '.join(prune_keys)})")
    settings = PruneSettings(**{k: _typed(where, k, v) for k, v in data.items() if k in prune_keys})
    _check(settings, where)
    space = _search_space(data.get("search_space"), settings, where)
    fixed_and_searched = [k for k in space if k in data]
    if fixed_and_searched:
        raise SearchError(f"{where}: {fixed_and_searched[0]} is both fixed and in search_space; keep one")
    sampler = data.get("sampler", "grid" if all(isinstance(d, list) for d in space.values()) else "tpe")
    if sampler not in ("grid", "tpe"):
        raise SearchError(f"{where}: unknown sampler {sampler!r}; allowed: grid, tpe")
    if sampler == "grid" and not all(isinstance(d, list) for d in space.values()):
        raise SearchError(f"{where}: a grid needs a list of values for every parameter; use sampler: tpe for ranges")
    objectives, directions = _objectives(data, settings, where)
    grid_size = math.prod(len(d) for d in space.values()) if sampler == "grid" else None
    n_trials = n_trials if n_trials is not None else data.get("n_trials", grid_size)
    if n_trials is None:
        raise SearchError(f"{where}: n_trials missing; a TPE study needs it")
    spec = StudySpec(
        name=study_name or str(data.get("study_name") or path.stem), storage=storage or _config_storage(where, data),
        settings=settings, space=space, sampler=sampler, objectives=objectives, directions=directions,
        n_trials=_integer(where, "n_trials", n_trials),
        sampler_seed=data.get("sampler_seed") and _integer(where, "sampler_seed", data["sampler_seed"], minimum=0),
        **{k: _integer(where, k, data[k], minimum=0) for k in ("max_retry",) if k in data})
    return spec


def _config_storage(where: str, data: dict) -> str:
    """The config's `storage` (a URL, file path or profile), else the default."""
    value = data.get("storage") or DEFAULT_STORAGE
    if not isinstance(value, str):
        raise SearchError(f"{where}: storage {value!r}; allowed: a database URL, a file path or a profile name")
    try:
        return profiles.storage(value)
    except profiles.ProfileError as err:
        raise SearchError(f"{where}: {err}") from None


def _integer(where: str, key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SearchError(f"{where}: {key} {value!r} out of range; allowed: an integer >= {minimum}")
    return value


def _typed(where: str, name: str, value):
    """`value` as the type of PruneSettings field `name` (ints stay ints; an int is a valid float)."""
    kind = _field_type(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SearchError(f"{where}: {name} {value!r} is not a {kind.__name__}")
    return value


def _check(settings: PruneSettings, where: str) -> None:
    try:
        settings.check()
    except ModelError as err:
        raise SearchError(f"{where}: {err}") from None


def _search_space(raw, settings: PruneSettings, where: str) -> dict:
    """The checked search space: every value (or range end) is a valid setting of its parameter."""
    if not isinstance(raw, dict) or not raw:
        raise SearchError(f"{where}: search_space missing; give a list of values (grid) or a range "
                          "{low, high} (TPE) per parameter, e.g. taylor_seq_len: [16, 32, 64]")
    space = {}
    for name, domain in raw.items():
        at = f"{where}: search_space.{name}"
        if name not in asdict(settings):
            raise SearchError(f"{at}: unknown parameter; allowed: {', '.join(asdict(settings))}")
        if isinstance(domain, list) and domain:
            values = [_typed(at, name, v) for v in domain]
            if len(set(values)) < len(values):
                raise SearchError(f"{at}: repeated value in {domain}")
        elif isinstance(domain, dict) and {"low", "high"} <= set(domain) <= {"low", "high", "step", "log"}:
            if _field_type(name) not in (int, float):
                raise SearchError(f"{at}: a range needs a numeric parameter; give a list of values")
            domain = {**domain, "low": _typed(at, name, domain["low"]), "high": _typed(at, name, domain["high"])}
            if domain["low"] >= domain["high"]:
                raise SearchError(f"{at}: low {domain['low']} must be below high {domain['high']}")
            values = [domain["low"], domain["high"]]
        else:
            raise SearchError(f"{at}: expected a non-empty list of values or a mapping with low, high "
                              f"(and optionally step, log), got {domain!r}")
        for value in values:
            _check(replace(settings, **{name: value}), at)
        space[name] = values if isinstance(domain, list) else domain
    return space


def _objectives(data: dict, settings: PruneSettings, where: str) -> tuple[list[str], list[str]]:
    """(objective metrics, directions); each objective must be a metric that prune runs log."""
    objectives = data.get("objective", "acc_mean")
    objectives = [objectives] if isinstance(objectives, str) else objectives
    if not isinstance(objectives, list) or not objectives or not all(isinstance(o, str) for o in objectives):
        raise SearchError(f"{where}: objective {data['objective']!r}; allowed: a metric name or a list of them")
    known = known_metrics(settings)
    for name in objectives:
        if name not in known:
            shown = ", ".join(sorted(m for m in known if not m.startswith("baseline_")))
            raise SearchError(f"{where}: unknown objective metric {name!r}; allowed: {shown}, or baseline_<score>")
    directions = data.get("direction") or [_default_direction(o, where) for o in objectives]
    directions = [directions] if isinstance(directions, str) else directions
    if len(directions) != len(objectives) or any(d not in ("maximize", "minimize") for d in directions):
        raise SearchError(f"{where}: direction {data.get('direction')!r}; allowed: maximize or minimize, "
                          f"one per objective ({len(objectives)})")
    return objectives, directions


def _default_direction(metric: str, where: str) -> str:
    name = metric.removeprefix("baseline_")
    if name.startswith("acc"):
        return "maximize"
    if name.startswith("headline_mean"):
        return "maximize"
    if name.startswith(("ppl", "word_perplexity", "byte_perplexity", "bits_per_byte")):
        return "minimize"
    raise SearchError(f"{where}: direction missing for objective {metric!r}; allowed: maximize, minimize")


def known_metrics(settings: PruneSettings) -> set[str]:
    """Every metric a prune run with these settings can log (the possible objectives)."""
    tasks = parse_task_list(settings.tasks) + ([settings.ppl_task] if settings.ppl_task else [])
    scores = {f"{m}_{t}" for t in tasks for names in METRICS.values() for m in names} | {"acc_mean", "headline_mean"}
    scores |= {"ppl"} if settings.ppl_task else set()
    return (scores | {f"baseline_{s}" for s in scores} | {f"n_{t}" for t in tasks} | set(GRAD_COLUMNS)
            | set(RUN_METRICS))


# --------------------------------------------------------------------------- storage and study


def _storage_url(storage: str):
    url = storage_url(storage)
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        url = url.set(drivername="postgresql+psycopg2")  # SQLAlchemy 2.1 maps postgresql:// to psycopg 3
    return url


def storage_label(storage: str) -> str:
    """The storage URL as shown and tagged (password hidden)."""
    return _storage_url(storage).render_as_string(hide_password=True)


def open_storage(spec: StudySpec, client) -> RDBStorage:
    """The Optuna RDB storage of the study (workers coordinate through the claims table beside it)."""
    url = _storage_url(spec.storage)
    backend = url.get_backend_name()
    engine = {"connect_args": {"timeout": 60}} if backend == "sqlite" else {"pool_pre_ping": True}
    if backend == "postgresql":
        engine["connect_args"] = {"connect_timeout": 10}
    for attempt in itertools.count():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(url.render_as_string(hide_password=False), engine_kwargs=engine)
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError) as err:  # workers starting together race on the schema
            if attempt == 3:
                raise SearchError(f"cannot create the Optuna schema in {storage_label(spec.storage)!r}: "
                                  f"{_first_line(err)}") from None
            time.sleep(1 + attempt)
        except Exception as err:  # unreachable server, refused login, missing driver, bad path
            raise SearchError(f"cannot use Optuna storage {storage_label(spec.storage)!r}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def retry_callback(max_retry: int | None = None) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that enqueues a stopped trial's parameters again (at most `max_retry` times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def redo_trial(client, study: optuna.Study, trial, reason: str, max_retry: int | None) -> None:
    """A trial whose worker stopped: mark its MLflow run KILLED with `reason`, enqueue its point again."""
    parent = study.user_attrs.get(SETUP_ATTR, {}).get("parent_run_id")
    for run in trial_runs(client, parent) if parent else []:
        if run.data.tags.get(TRIAL_TAG) == str(trial.number) and run.info.status == "RUNNING":
            tracking.kill(client, run.info.run_id, f"{reason}; trial redone")
    retry_callback(max_retry)(study, trial)


def trial_key(study: optuna.Study, number: int) -> str:
    """The claim of trial `number` in the claims table."""
    return f"optuna:{study.study_name}:{number}"


def open_study(spec: StudySpec, storage: RDBStorage, client) -> tuple[optuna.Study, str]:
    """The study and its MLflow parent run id: set up by the first worker, joined by the others."""
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions,
                                    sampler=spec.sampler_object())
        study.set_metric_names(spec.objectives)  # optuna-dashboard shows them instead of "Objective 0"
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=spec.sampler_object())
        return study, _join(study, spec, client)
    return study, _set_up(study, spec, client)


def _set_up(study: optuna.Study, spec: StudySpec, client) -> str:
    """Create the parent run (the `mlflow run` run when there is one), enqueue the grid, mark the study ready."""
    name = tracking.run_name(KIND, {"model": spec.settings.model, "tasks": spec.settings.tasks,
                                    "n_samples": spec.settings.n_samples, "study_name": spec.name})
    parent = os.environ.get("MLFLOW_RUN_ID")
    if parent:
        tracking.name_run(client, parent, name)
    else:
        exp_id = tracking.experiment_id(client, f"taylor_study/{spec.settings.model}")
        parent = client.create_run(exp_id, run_name=name).info.run_id
    searched = set(spec.space)
    params = {**{k: v for k, v in asdict(spec.settings).items() if k not in searched}, "sampler": spec.sampler,
              "search_space": json.dumps(spec.space), "objective": ",".join(spec.objectives),
              "direction": ",".join(spec.directions)}
    existing = client.get_run(parent).data.params
    tracking.log(client, parent, params={k: v for k, v in params.items() if k not in existing and str(v) != ""},
                 tags={tracking.KIND: KIND, STUDY_TAG: spec.name, STORAGE_TAG: storage_label(spec.storage),
                       tracking.HOST: socket.gethostname(), tracking.PID: str(os.getpid())})
    if spec.sampler == "grid":
        for number, point in enumerate(spec.grid()):
            study.enqueue_trial(point, user_attrs={"grid_point": number})
    study.set_user_attr(SETUP_ATTR, {"parent_run_id": parent, "tracking_uri": client.tracking_uri, **spec.identity()})
    return parent


def study_setup(study: optuna.Study, wait_s: float = 0) -> dict:
    """The `prunetrack` user attr of a study, waiting up to `wait_s` for its first worker to write it."""
    deadline = time.monotonic() + wait_s
    while SETUP_ATTR not in (attrs := study.user_attrs):
        if time.monotonic() >= deadline:
            raise SearchError(f"study {study.study_name!r} was never set up (its first worker stopped while creating "
                              "it): delete it with `optuna delete-study --storage URL --study-name "
                              f"{study.study_name}` and start again")
        time.sleep(1)
    return attrs[SETUP_ATTR]


def _flat(identity: dict) -> dict:
    return {**identity["settings"], **{k: v for k, v in identity.items() if k != "settings"}}


def _join(study: optuna.Study, spec: StudySpec, client) -> str:
    """Check that this worker's config is the study's and that its tracking store holds the parent run."""
    setup = study_setup(study, READY_TIMEOUT_S)
    ours, theirs = _flat(spec.identity()), _flat(setup)
    differs = next((k for k in ours if ours[k] != theirs.get(k)), None)
    if differs:
        raise SearchError(f"study {spec.name!r} was created with {differs} {json.dumps(theirs.get(differs))[:200]}, "
                          f"this config has {json.dumps(ours[differs])[:200]}; give this config another study_name")
    parent = setup["parent_run_id"]
    try:
        client.get_run(parent)
    except Exception:
        raise tracking.TrackingError(
            f"study {spec.name!r} records into {setup['tracking_uri']!r} (parent run {parent}), which this worker's "
            f"tracking store {client.tracking_uri!r} does not hold: use the same store") from None
    own = os.environ.get("MLFLOW_RUN_ID")
    if own and own != parent:  # this `mlflow run` is a worker of the study: link it to the parent
        tracking.log(client, own, tags={tracking.KIND: WORKER_KIND, STUDY_TAG: spec.name, MLFLOW_PARENT_RUN_ID: parent,
                                        tracking.HOST: socket.gethostname(), tracking.PID: str(os.getpid())})
    return parent


def load_existing(spec: StudySpec, storage: RDBStorage) -> optuna.Study:
    """A study that must already exist (for `report_only`)."""
    try:
        return optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        raise SearchError(f"no study {spec.name!r} in {storage_label(spec.storage)}; start it first") from None


# --------------------------------------------------------------------------- trials


def trial_runs(client, parent: str) -> list:
    """The trial runs under a study's parent run, oldest first."""
    exp_id = client.get_run(parent).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent}' and tags.`{tracking.KIND}` = '{TRIAL_KIND}'"
    return client.search_runs([exp_id], query, max_results=50000, order_by=["attributes.start_time ASC"])


class TrialRunner:
    """The objective: one prune run per trial, a child of the study's parent run."""

    def __init__(self, spec: StudySpec, client, parent: str, claims: Claims):
        self.spec, self.client, self.parent, self.claims = spec, client, parent, claims
        self.exp_id = client.get_run(parent).info.experiment_id
        self.fatal: BaseException | None = None  # a user error: stops this worker after the trial is recorded
        self.evaluated = 0

    def __call__(self, trial: optuna.Trial):
        if self.spec.sampler == "grid" and "grid_point" not in trial.user_attrs:
            raise optuna.TrialPruned("no grid point left: another worker took the last one")
        client, name, run_id = self.client, self.spec.name, None
        key = trial_key(trial.study, trial.number)
        if not self.claims.take(key, None):  # a new trial number; a row left by a deleted study of the same name
            self.claims.take(key, self.claims.rows([key]).get(key))
        try:
            settings = replace(self.spec.settings, **self.spec.suggest(trial))
            run_id = client.create_run(self.exp_id, run_name=f"{name}-trial-{trial.number}", tags={
                MLFLOW_PARENT_RUN_ID: self.parent, tracking.KIND: TRIAL_KIND, STUDY_TAG: name,
                TRIAL_TAG: str(trial.number), tracking.HOST: socket.gethostname(),
                tracking.PID: str(os.getpid())}).info.run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            given = {k: v for k, v in asdict(settings).items() if str(v) != ""}  # unset options show as absent, not ''
            tracking.log(client, run_id, params={**given, "study_name": name, "trial_number": trial.number})
            self.evaluated += 1
            metrics = prune_and_evaluate(client, run_id, self.exp_id, settings)
            missing = [m for m in self.spec.objectives if m not in metrics]
            if missing:
                raise SearchError(f"objective {missing[0]!r} was not logged; logged: {', '.join(sorted(metrics))}")
        except Exception as err:
            if run_id:
                tracking.fail(client, run_id, err)
            trial.set_user_attr("error", error_line(err))
            self.claims.settle(key, error_line(err))
            if isinstance(err, USER_ERRORS):
                self.fatal = err
            raise
        except BaseException as err:  # Ctrl-C, SIGTERM: the point goes back to the queue
            if run_id:
                tracking.kill(client, run_id, f"{tracking.error_tag(err)}; trial redone")
            frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
            retry_callback()(trial.study, frozen)
            self.claims.settle(key, tracking.error_tag(err))
            raise
        finally:
            free_memory()
        client.set_terminated(run_id, "FINISHED")
        self.claims.settle(key)
        values = [metrics[m] for m in self.spec.objectives]
        return values if len(values) > 1 else values[0]


def _counts(trial) -> bool:
    """Whether a finished trial uses up the budget: it completed, or its evaluation failed with an error."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def fail_stopped_trials(study: optuna.Study, claims: Claims, client, max_retry: int | None) -> int:
    """Fail the RUNNING trials whose worker is gone, by their claims (search.work.Claims.alive: same
    machine, process exited: at once; another machine: no heartbeat for STALE_S s), and redo them
    (run KILLED, point enqueued again); how many. The claim is taken over first, so one worker does it."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    rows = claims.rows([trial_key(study, t.number) for t in running])
    failed = 0
    for trial in running:
        key, claim = trial_key(study, trial.number), rows.get(trial_key(study, trial.number))
        if claim is None:  # its worker stopped between taking the trial and claiming it, or is about to claim it
            if time.time() - trial.datetime_start.timestamp() < STALE_S:
                continue
            reason = f"worker stopped before claiming the trial (no claim after {STALE_S} s)"
        elif claim.status != RUNNING or claims.alive(claim):
            continue
        else:
            host, pid, _ = claim.owner.rsplit(":", 2)
            reason = (f"worker process {host}:{pid} died" if host == socket.gethostname()
                      else f"worker {host}:{pid} sent no heartbeat for {STALE_S} s")
        if not claims.take(key, claim):
            continue  # another worker took it over first
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # its worker finished it meanwhile
            claims.settle(key)
            continue
        redo_trial(client, study, copy.deepcopy(study._storage.get_trial(trial._trial_id)), reason, max_retry)
        claims.settle(key, reason)
        failed += 1
    return failed


def work(study: optuna.Study, spec: StudySpec, runner: TrialRunner) -> None:
    """Run trials until the study has none left for this worker, waiting for other workers' running trials
    (a stopped one is failed and enqueued again). A user error stops the worker after its trial is recorded."""
    told = False
    while True:
        fail_stopped_trials(study, runner.claims, runner.client, spec.max_retry)
        trials = study.get_trials(deepcopy=False)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if sum(map(_counts, trials)) + running >= spec.n_trials or (spec.sampler == "grid" and not waiting):
            if not running:
                return
            if not told:
                print(f"waiting for {running} trial(s) of other workers", file=sys.stderr)
                told = True
            time.sleep(POLL_S)
            continue
        study.optimize(runner, n_trials=1, catch=(Exception,))
        if runner.fatal:
            raise runner.fatal


def _stop_parent(client, study: optuna.Study, parent: str, err: BaseException) -> None:
    """A worker stopped by an error, Ctrl-C or SIGTERM: when no other worker has a trial running, the parent
    run ends KILLED or FAILED with the reason (the next start, or a surviving worker, finishes it)."""
    try:
        if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
            return
    except Exception:  # the storage is not answering: leave the parent to the next start
        return
    tracking.fail(client, parent, err)


# --------------------------------------------------------------------------- report


def results_table(client, study: optuna.Study, setup: dict) -> pd.DataFrame:
    """One row per trial that got a point: the seed's `search_results.csv` columns plus state, success,
    duration (s), MLflow run id and error; values from the trial runs in the store."""
    runs = {int(r.data.tags[TRIAL_TAG]): r for r in trial_runs(client, setup["parent_run_id"])}
    base, space = setup["settings"], setup["space"]
    params = [*PARAM_COLUMNS, *(p for p in space if p not in PARAM_COLUMNS)]
    logged = set().union(*(r.data.metrics for r in runs.values()))
    accs = [f"acc_{t}" for t in parse_task_list(base["tasks"]) if f"acc_{t}" in logged]
    metrics = [*accs, *SUMMARY_COLUMNS]
    metrics += [o for o in setup["objectives"] if o not in metrics]
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING or not trial.params:
            continue
        run = runs.get(trial.number)
        values = run.data.metrics if run else {}
        rows.append({
            "trial_number": trial.number, "state": trial.state.name,
            "success": trial.state == TrialState.COMPLETE and run is not None and run.info.status == "FINISHED",
            **{p: trial.params.get(p, base.get(p)) for p in params},
            **{m: values.get(m, math.nan) for m in metrics},
            "duration": trial.duration.total_seconds() if trial.duration else math.nan,
            "mlflow_run_id": run.info.run_id if run else "",
            "error": trial.user_attrs.get("error") or (run.data.tags.get(tracking.ERROR, "") if run else ""),
        })
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
    target = {} if len(setup["objectives"]) == 1 else {
        "target": lambda t: t.values[0], "target_name": setup["objectives"][0]}
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
            skipped[name] = error_line(err)
    return skipped


def write_report(client, study: optuna.Study, setup: dict) -> pd.DataFrame:
    """Log `search_results.csv`, the plots (`plots/`) and trial counts to the parent run; returns the table."""
    parent = setup["parent_run_id"]
    table = results_table(client, study, setup)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / RESULTS, index=False)
        client.log_artifact(parent, str(Path(tmp) / RESULTS))
        skipped = save_plots(study, setup, Path(tmp) / "plots")
        client.log_artifacts(parent, str(Path(tmp) / "plots"), "plots")
    for name, reason in skipped.items():
        print(f"note: plot {name} skipped: {reason}", file=sys.stderr)
    counted = [t for t in study.get_trials(deepcopy=False) if _counts(t)]
    metrics = {"trials_complete": sum(t.state == TrialState.COMPLETE for t in counted),
               "trials_failed": sum(t.state == TrialState.FAIL for t in counted)}
    tags = {"plots_skipped": "; ".join(f"{k}: {v}" for k, v in skipped.items())}
    if len(setup["objectives"]) == 1 and metrics["trials_complete"]:
        best = study.best_trial
        metrics[f"best_{setup['objectives'][0]}"] = best.value
        tags["best_trial"] = str(best.number)
    tracking.log(client, parent, metrics=metrics, tags=tags)
    return table


def summary(spec: StudySpec, study: optuna.Study, table: pd.DataFrame, setup: dict, evaluated: int | None) -> str:
    """What the study holds now, its best trial, and where to look."""
    done = table[table["success"]]
    lines = [f"study {spec.name!r} ({spec.sampler}): {len(done)} trials complete, "
             f"{int((table['state'] == 'FAIL').sum())} failed or redone"
             + (f"; this worker evaluated {evaluated}" if evaluated is not None else "")]
    if len(spec.objectives) == 1 and len(done):
        best = study.best_trial
        lines.append(f"best {spec.objectives[0]} {best.value:.4g}: trial {best.number}, "
                     + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    lines.append(f"parent run: {setup['parent_run_id']} (artifacts {RESULTS}, plots/)")
    lines.append(f"see it: optuna-dashboard {storage_label(spec.storage)}   |   {tracking.ui_hint(setup['tracking_uri'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _optional_int(text: str) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def parser() -> argparse.ArgumentParser:
    """The `taylor_study` entry point's arguments (the MLproject names) plus the tracking URI."""
    p = tracking.ArgumentParser(description="Optuna study of Taylor pruning parameters, every trial an MLflow run")
    p.add_argument("--config", default="quick", help="study config: a name in mlruns_config/studies or a .yaml path")
    p.add_argument("--storage", default="", help="Optuna storage URL, file path or profile name (mlruns_config/profiles), "
                   "overrides the config's (default sqlite:///optuna.db); no password: use a profile, PGPASSWORD or ~/.pgpass")
    p.add_argument("--study_name", default="", help="overrides the config's (default: the config file's name)")
    p.add_argument("--n_trials", type=_optional_int, default=None, help="trials the study holds; overrides the config's")
    p.add_argument("--report_only", choices=("true", "false"), default="false",
                   help="only (re)build search_results.csv and the plots of an existing study")
    p.add_argument("--tracking_uri", default="", help="overrides MLFLOW_TRACKING_URI")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    spec = load_spec(args.config, args.storage, args.study_name, args.n_trials)
    client = tracking.connect(args.tracking_uri or None)
    storage = open_storage(spec, client)
    if args.report_only == "true":
        study = load_existing(spec, storage)
        setup = study_setup(study)
        evaluated = None
    else:
        study, parent = open_study(spec, storage, client)
        setup = study_setup(study)
        with Claims(spec.storage) as claims:
            runner = TrialRunner(spec, client, parent, claims)
            try:
                work(study, spec, runner)
            except BaseException as err:
                _stop_parent(client, study, parent, err)
                raise
        evaluated = runner.evaluated
    table = write_report(client, study, setup)
    if evaluated is not None:
        parent = setup["parent_run_id"]
        if tracking.ERROR in client.get_run(parent).data.tags:  # an earlier start was stopped; this one finished
            client.delete_tag(parent, tracking.ERROR)
        client.set_terminated(parent, "FINISHED")
    print(summary(spec, study, table, setup, evaluated))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
