"""Where a Taylor study lives: its Optuna storage, and the study in it with its MLflow parent run.

The first worker creates the Optuna study (atomic on the storage) and the parent run, enqueues every
grid point once as a WAITING trial, then writes the study user attr `prunetrack` (parent run id,
tracking URI, config), which tells the other workers it is ready. A later worker joins: it checks
that its config and tracking store are the study's, and under `mlflow run` links its own run to the
parent as a `prunetrack.kind=study_worker` child.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from dataclasses import asdict

import optuna
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage

from contract import names, naming, schema, stores, tracking
from search.cli import SearchError
from search.study_spec import StudySpec
from search.work import engine_url

SETUP_ATTR = "prunetrack"  # study user attr the first worker writes last: parent run, tracking URI, config
READY_TIMEOUT_S = 60  # how long a worker waits for the first worker to set a new study up


def storage_label(storage: str) -> str:
    """The storage URL as shown and tagged (password hidden)."""
    return engine_url(storage).render_as_string(hide_password=True)


def open_storage(spec: StudySpec) -> RDBStorage:
    """The Optuna RDB storage of the study (workers coordinate through the claims table beside it)."""
    url = engine_url(spec.storage)
    backend = url.get_backend_name()
    engine = {"connect_args": {"timeout": 60}} if backend == "sqlite" else {"pool_pre_ping": True}
    if backend == "postgresql":
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        with warnings.catch_warnings(), schema.creation_lock(url):  # workers starting together: one creates it
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(url.render_as_string(hide_password=False), engine_kwargs=engine)
    except Exception as err:  # unreachable server, refused login, missing driver, bad path
        raise SearchError(f"cannot use Optuna storage {storage_label(spec.storage)!r}: {stores.first_line(err)}") from None


def open_study(spec: StudySpec, storage: RDBStorage, client) -> tuple[optuna.Study, str]:
    """The study and its MLflow parent run id: set up by the first worker, joined by the others."""
    try:
        study = optuna.create_study(
            storage=storage, study_name=spec.name, directions=spec.directions, sampler=spec.sampler_object()
        )
        study.set_metric_names(spec.objectives)  # optuna-dashboard shows them instead of "Objective 0"
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=spec.sampler_object())
        return study, _join(study, spec, client)
    return study, _set_up(study, spec, client)


def _set_up(study: optuna.Study, spec: StudySpec, client) -> str:
    """Open the parent run (the `mlflow run` run when there is one), enqueue the grid, mark the study ready."""
    searched = set(spec.space)
    params = {
        **{k: v for k, v in asdict(spec.settings).items() if k not in searched},
        "sampler": spec.sampler,
        "search_space": json.dumps(spec.space),
        "objective": ",".join(spec.objectives),
        "direction": ",".join(spec.directions),
    }
    name = naming.run_name(
        names.STUDY,
        {
            "model": spec.settings.model,
            "tasks": spec.settings.tasks,
            "n_samples": spec.settings.n_samples,
            "study_name": spec.name,
        },
    )
    parent, _ = tracking.open_run(
        client,
        names.STUDY,
        f"taylor_study/{spec.settings.model}",
        params,
        {names.STUDY_NAME: spec.name, names.STORAGE: storage_label(spec.storage)},
        name,
    )
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
            raise SearchError(
                f"study {study.study_name!r} was never set up (its first worker stopped while creating "
                "it): delete it with `optuna delete-study --storage URL --study-name "
                f"{study.study_name}` and start again"
            )
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
        raise SearchError(
            f"study {spec.name!r} was created with {differs} {json.dumps(theirs.get(differs))[:200]}, "
            f"this config has {json.dumps(ours[differs])[:200]}; give this config another study_name"
        )
    parent = setup["parent_run_id"]
    try:
        client.get_run(parent)
    except Exception:
        raise stores.TrackingError(
            f"study {spec.name!r} records into {setup['tracking_uri']!r} (parent run {parent}), which this worker's "
            f"tracking store {client.tracking_uri!r} does not hold: use the same store"
        ) from None
    own = os.environ.get("MLFLOW_RUN_ID")
    if own and own != parent:  # this `mlflow run` is a worker of the study: link it to the parent, name it as such
        worker = {"model": spec.settings.model, "tasks": spec.settings.tasks, "n_samples": spec.settings.n_samples}
        naming.name_run(client, own, naming.run_name(names.STUDY_WORKER, {**worker, "study_name": spec.name}))
        tracking.log(
            client,
            own,
            tags={
                names.KIND: names.STUDY_WORKER,
                names.STUDY_NAME: spec.name,
                MLFLOW_PARENT_RUN_ID: parent,
                names.HOST: socket.gethostname(),
                names.PID: str(os.getpid()),
            },
        )
    return parent


def load_existing(spec: StudySpec, storage: RDBStorage) -> optuna.Study:
    """A study that must already exist (for `report_only`)."""
    try:
        return optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        raise SearchError(f"no study {spec.name!r} in {storage_label(spec.storage)}; start it first") from None
