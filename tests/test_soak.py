"""Soak test: three beam search workers on the default model share their claims (PostgreSQL, SQLite) while
five of them, chosen at random among those scoring, are killed with kill -9 and restarted. Every
configuration is FINISHED exactly once, nothing is left RUNNING, the recommendations equal an
uninterrupted run's, and the worst takeover time (kill to the dead worker's runs marked KILLED by
another worker) is reported."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from helpers import assert_each_config_once, copy_store, runs

from contract import names, tracking
from search import beam, work
from search.cli import run_main

WORKERS, KILLS = 3, 5
# the default model (SmolLM2-135M, 30 blocks) at tiny n; 6 free blocks, 2 steps, one configuration per claim
# so that the three workers share every step
ARGS = [
    *("--model", "default", "--tasks", "pydoc_cloze", "--n_samples", "2", "--batch_size", "8", "--device", "cpu"),
    *("--beam_width", "2", "--max_removed", "2", "--protect", "0-23", "--claim_size", "1", "--retry_delay", "0"),
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # three workers share the test machine's cores

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.soak]


def recommendations(client) -> list[list[dict]]:
    """The recommendations of every FINISHED beam search in the store, run ids left out."""
    found = [tracking.load_json(client, r.info.run_id, names.BEAM_RESULTS) for r in runs(client, "beam_search", "FINISHED")]
    return [[{k: v for k, v in e.items() if k != "run_id"} for e in f["recommendations"]] for f in found]


@pytest.fixture(scope="module")
def uninterrupted(store_template, tmp_path_factory) -> list[dict]:
    uri, client = copy_store(store_template, tmp_path_factory.mktemp("uninterrupted") / "mlflow.db")
    assert run_main(beam.main, [*ARGS, "--tracking_uri", uri]) == 0
    (found,) = recommendations(client)
    return found


def scoring_owners(engine) -> set[int]:
    """The pids of the workers holding a running claim."""
    with engine.connect() as conn:
        table = sa.Table(work.TABLE, sa.MetaData(), autoload_with=conn)
        owners = conn.execute(sa.select(table.c.owner).where(table.c.status == work.RUNNING)).scalars()
        return {int(owner.rsplit(":", 2)[1]) for owner in owners}


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_three_workers_survive_five_kill_minus_9s(backend, uninterrupted, sqlite_store, tmp_path, request, measured):
    uri, client = sqlite_store
    storage = request.getfixturevalue("postgres_db") if backend == "postgresql" else str(tmp_path / "claims.db")
    command = [sys.executable, "-m", "search.beam", *ARGS, "--tracking_uri", uri, "--storage", storage]
    logs = {}

    def start() -> subprocess.Popen:
        log = tmp_path / f"worker{len(logs)}.log"
        worker = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        logs[worker.pid] = log
        return worker

    rng, workers, kills = random.Random(0), [start() for _ in range(WORKERS)], []
    engine = sa.create_engine(work.engine_url(storage))
    deadline = time.time() + 600
    while len(kills) < KILLS:
        assert time.time() < deadline, f"only {len(kills)} kills in 10 minutes"
        assert any(w.poll() is None for w in workers), f"the search ended after {len(kills)} of {KILLS} kills"
        try:
            scoring = [w for w in workers if w.poll() is None and w.pid in scoring_owners(engine)]
        except sa.exc.NoSuchTableError:  # no worker has opened the claims table yet
            scoring = []
        if not scoring:
            time.sleep(0.2)
            continue
        victim = rng.choice(scoring)
        time.sleep(rng.uniform(0, 1))  # somewhere in its scoring
        os.kill(victim.pid, signal.SIGKILL)
        kills.append((victim.pid, time.time()))
        victim.wait()
        workers[workers.index(victim)] = start()
    engine.dispose()
    for worker in workers:
        assert worker.wait(timeout=600) == 0, logs[worker.pid].read_text()[-3000:]

    statuses = assert_each_config_once(client)
    assert not runs(client, status="RUNNING")
    finished = recommendations(client)
    assert len(finished) == WORKERS and all(f == uninterrupted for f in finished)
    takeovers = []
    for pid, killed_at in kills:
        orphans = [r for r in runs(client, "config", "KILLED") if r.data.tags.get(names.PID) == str(pid)]
        if orphans:
            takeovers.append(max(r.info.end_time for r in orphans) / 1000 - killed_at)
    assert takeovers, "no kill hit a worker with runs in flight"
    measured(
        f"soak ({backend}): {KILLS} kill -9s, {statuses['FINISHED']} configurations FINISHED once; takeover of a dead "
        f"worker's runs: worst {max(takeovers):.1f} s, median {sorted(takeovers)[len(takeovers) // 2]:.1f} s "
        f"({len(takeovers)} kills with runs in flight)"
    )
