"""Workers that start together, and workers that die (#26): any number of processes starting at the same
moment on a fresh store create and migrate it exactly once; a store that is really broken says so and
how to repair it; a search whose `mlflow run` launcher dies stops and marks its runs KILLED."""

import multiprocessing
import sqlite3

import pytest
from servers import postgres_database

from contract import tracking

WORKERS, ROUNDS = 8, 10


def _start(uri: str, barrier, results) -> None:
    """One worker's start: connect to the store, then file a run under an experiment of its own."""
    try:
        barrier.wait(timeout=60)
        client = tracking.connect(uri)
        client.create_run(tracking.experiment_id(client, "together"))
        results.put("ok")
    except BaseException as err:
        results.put(f"{type(err).__name__}: {err}")


def start_together(uri: str, n: int = WORKERS) -> list[str]:
    """What each of `n` processes, forked from this one (MLflow imported once) and released at the same
    moment, reports of its start on store `uri`."""
    fork = multiprocessing.get_context("fork")
    barrier, results = fork.Barrier(n), fork.Queue()
    procs = [fork.Process(target=_start, args=(uri, barrier, results)) for _ in range(n)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    return outcomes


def check_store(client) -> None:
    [experiment] = [e for e in client.search_experiments() if e.name == "together"]
    assert len(client.search_runs([experiment.experiment_id])) == WORKERS


@pytest.mark.service
def test_workers_starting_together_on_a_fresh_sqlite_store(tmp_path):
    for i in range(ROUNDS):
        uri = f"sqlite:///{tmp_path}/round{i}/mlflow.db"
        assert start_together(uri) == ["ok"] * WORKERS, f"round {i}"
        check_store(tracking.connect(uri))


@pytest.mark.service
def test_workers_starting_together_on_a_fresh_postgresql_database():
    for i in range(ROUNDS):
        with postgres_database() as uri:
            assert start_together(uri) == ["ok"] * WORKERS, f"round {i}"
            check_store(tracking.connect(uri))


def test_a_broken_store_says_so_and_how_to_repair_it(tmp_path, store_template):
    """A migration cut short leaves `_alembic_tmp_*` tables and an old schema version behind."""
    path = tmp_path / "mlflow.db"
    path.write_bytes(store_template.read_bytes())
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE _alembic_tmp_latest_metrics (key TEXT)")
        db.execute("UPDATE alembic_version SET version_num = '0584bdc529eb'")
    with pytest.raises(tracking.TrackingError) as info:
        tracking.connect(f"sqlite:///{path}")
    message = str(info.value)
    assert message.startswith(f"tracking store 'sqlite:///{path}' is a database MLflow cannot use (")
    assert "cannot reach" not in message
    assert message.endswith(
        "to repair it, back it up, drop the table(s) _alembic_tmp_latest_metrics a migration cut short left behind, "
        f"then run `mlflow db upgrade sqlite:///{path}`"
    )
