"""Beam search over removed blocks: brute-force agreement, kill -9 and resume, workers sharing
PostgreSQL, out-of-memory and failure handling, bad input, and `mlflow run -e beam_search`."""

import itertools
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from helpers import assert_each_config_once, copy_store, mlflow_run, runs
from mlflow.tracking import MlflowClient

import pruning.evaluate
from contract import names, tracking
from pruning.drop import drop
from pruning.evaluate import Evaluator
from pruning.models import load_model
from pruning.tasks import load_task
from pruning.units import Unit
from search import beam, sensitivity, work
from search.cli import SearchError, run_main

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["pydoc_ppl", "pydoc_cloze"]
N_BLOCKS, WIDTH, STEPS = 6, 2, 3
# 1 thread: the tiny model gains nothing from more, and the 2 cores are shared
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread", "scratch_cwd")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    """A random 6-block Llama with the character tokenizer (tests/conftest.py)."""
    return tiny_model_dir(layers=N_BLOCKS, initializer_range=0.3)


def argv(model: str, uri: str, *extra: str) -> list[str]:
    return [
        "--model",
        model,
        "--tasks",
        ",".join(TASKS),
        "--n_samples",
        "4",
        "--batch_size",
        "16",
        "--tracking_uri",
        uri,
        "--beam_width",
        str(WIDTH),
        "--max_removed",
        str(STEPS),
        "--retry_delay",
        "0",
        *extra,
    ]


def finished_results(client: MlflowClient) -> list[dict]:
    return [tracking.load_json(client, r.info.run_id, names.BEAM_RESULTS) for r in runs(client, "beam_search", "FINISHED")]


def comparable(results: dict, steps: int = STEPS) -> dict:
    """What must be the same in any store, for removing 1..steps blocks (run ids differ)."""

    def strip(entries):
        return [{k: v for k, v in e.items() if k != "run_id"} for e in entries[:steps]]

    return {
        "baseline": results["baseline"],
        "failed": results["failed"],
        "recommendations": strip(results["recommendations"]),
        "per_task": {t: strip(e) for t, e in results["per_task"].items()},
        "num_active_blocks": {k: v for k, v in results["num_active_blocks"].items() if int(k) >= N_BLOCKS - steps},
    }


def assert_close(a, b, path="results"):
    """Equal structures; numbers equal to 1e-9 (relative)."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


@pytest.fixture(scope="module")
def reference(model_dir, store_template, tmp_path_factory):
    """An uninterrupted search in its own store, after a sensitivity study of the same model."""
    uri, client = copy_store(store_template, tmp_path_factory.mktemp("reference") / "mlflow.db")
    common = ["--model", model_dir, "--tasks", ",".join(TASKS), "--n_samples", "4", "--batch_size", "16", "--tracking_uri", uri]
    assert run_main(sensitivity.main, common) == 0
    assert run_main(beam.main, argv(model_dir, uri)) == 0
    (results,) = finished_results(client)
    return results, uri


def brute_force(model_dir: str) -> dict[tuple, dict[str, float]]:
    """Drop per task of every removal of 1..STEPS blocks, evaluated directly."""
    loaded = load_model(model_dir)
    tasks = [load_task(t, "validation", 4, 0) for t in TASKS]
    evaluator = Evaluator(loaded, tasks, 16)
    base = {t: s.metrics for t, s in evaluator.evaluate(()).items()}
    table = {}
    for k in range(1, STEPS + 1):
        for removed in itertools.combinations(range(N_BLOCKS), k):
            scores = evaluator.evaluate(removed)
            table[removed] = {t.name: drop(t, base[t.name], scores[t.name].metrics) for t in tasks}
    return table


def reference_beam(table, key, width: int) -> list[list[tuple]]:
    """The kept beam of each step, written out independently of search.beam."""
    beam_, kept = [()], []
    for _ in range(STEPS):
        candidates = {tuple(sorted(c + (b,))) for c in beam_ for b in range(N_BLOCKS) if b not in c}
        beam_ = sorted(candidates, key=lambda c: (key(table[c]), c))[:width]
        kept.append(beam_)
    return kept


def test_beam_equals_brute_force_reference_and_finds_global_optimum(model_dir, reference):
    results, uri = reference
    client = MlflowClient(uri)
    table = brute_force(model_dir)
    mean = lambda drops: float(np.mean(list(drops.values())))  # noqa: E731
    keys = {"mean": mean, **{t: (lambda drops, t=t: drops[t]) for t in TASKS}}
    parent = runs(client, "beam_search", "FINISHED")[0].info.run_id
    for k in range(1, STEPS + 1):
        step = tracking.load_json(client, parent, f"beam_step{k}.json")
        for name, key in keys.items():
            expected = reference_beam(table, key, WIDTH)[k - 1]
            assert [tuple(e["removed_blocks"]) for e in step["beams"][name]] == expected, (k, name)
        for row in step["candidates"]:
            assert_close(row["drops"], table[tuple(row["removed_blocks"])])
    for k, entry in enumerate(results["recommendations"], start=1):
        best = reference_beam(table, mean, WIDTH)[k - 1][0]
        drops = list(table[best].values())
        assert tuple(entry["removed_blocks"]) == best
        assert entry["mean_drop"] == pytest.approx(np.mean(drops)) and entry["std_drop"] == pytest.approx(np.std(drops))
        assert entry["n_datasets"] == 2 and entry["complete"]
        previous = results["recommendations"][k - 2]["mean_drop"] if k > 1 else 0.0
        assert entry["incremental_drop"] == pytest.approx(entry["mean_drop"] - previous)
        assert entry["active_blocks"] == [b for b in range(N_BLOCKS) if b not in best]
        assert results["num_active_blocks"][str(N_BLOCKS - k)] == entry["active_blocks"]
        for task in TASKS:
            assert tuple(results["per_task"][task][k - 1]["removed_blocks"]) == reference_beam(table, keys[task], WIDTH)[k - 1][0]
    # the baseline and every single-block removal came from the sensitivity study
    assert results["worker"]["reused"] == 1 + N_BLOCKS and results["failed"] == []
    history = client.get_metric_history(parent, "mean_drop")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]

    # a beam at least as wide as C(6, 2) sees every combination: the global optimum for each k
    stored = len(runs(client, "config", "FINISHED"))
    assert run_main(beam.main, argv(model_dir, uri, "--beam_width", "15", "--criterion", "mean")) == 0
    wide = finished_results(client)[-1]
    for k, entry in enumerate(wide["recommendations"], start=1):
        optimum = min((c for c in table if len(c) == k), key=lambda c: (mean(table[c]), c))
        assert tuple(entry["removed_blocks"]) == optimum
    assert wide["per_task"] == {}
    # every configuration of the narrow search is taken from the store, the others are evaluated
    assert wide["worker"]["reused"] == stored and wide["worker"]["evaluated"] == 1 + len(table) - stored


STALLING_WORKER = """
import os, sys, time
import pruning.evaluate as evaluate
plain, calls = evaluate.Evaluator.evaluate_many, []
def stall(self, *args, **kwargs):
    calls.append(args)
    if len(calls) == 3:  # inside step 2 (after the baseline and step 1), its runs RUNNING: wait to be killed
        open(os.environ["STALLED"], "w").close()
        time.sleep(600)
    return plain(self, *args, **kwargs)
evaluate.Evaluator.evaluate_many = stall
from search.beam import main
from search.cli import run_main
raise SystemExit(run_main(main, sys.argv[1:]))
"""


@pytest.mark.parametrize("shared", [False, True], ids=["alone", "with-storage"])
@pytest.mark.service
def test_kill_minus_9_then_resume_equals_uninterrupted_run(model_dir, reference, sqlite_store, tmp_path, shared):
    uri, client = sqlite_store
    args = argv(model_dir, uri, "--max_removed", "2", *(["--storage", str(tmp_path / "claims.db")] if shared else []))
    log, stalled = tmp_path / "killed.log", tmp_path / "stalled"
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLING_WORKER, *args],
        cwd=tmp_path,
        env={**ENV, "STALLED": str(stalled)},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    deadline = time.time() + 180
    while not stalled.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the worker did not reach step 2"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reaped: its pid no longer exists
    running = [r.info.run_id for r in runs(client, "config", "RUNNING")]
    assert len(running) > 1  # the candidates of step 2, scored together
    (dead_parent,) = [r.info.run_id for r in runs(client, "beam_search", "RUNNING")]

    assert run_main(beam.main, args) == 0  # the same command again
    (resumed,) = finished_results(client)
    assert_close(comparable(resumed), comparable(reference[0], steps=2))
    statuses = assert_each_config_once(client)
    assert statuses["KILLED"] == len(running) and sum(statuses.values()) == statuses["FINISHED"] + len(running)
    assert resumed["worker"]["reused"] == 1 + N_BLOCKS  # the baseline and step 1
    killed, parent = client.get_run(running[0]), client.get_run(dead_parent)
    assert killed.info.status == parent.info.status == "KILLED"
    assert "died before" in parent.data.tags[names.ERROR]
    assert f"{socket.gethostname()}:{proc.pid}" in killed.data.tags[names.ERROR]  # the dead worker, named
    if shared:  # the dead worker's claim was taken over and settled
        claims = work.Claims(str(tmp_path / "claims.db"))
        assert {c.status for c in claims.rows([r.data.tags["config_hash"] for r in runs(client, "config")]).values()} == {"done"}


@pytest.mark.service
def test_three_workers_on_postgresql_evaluate_each_configuration_once(model_dir, reference, sqlite_store, postgres_db, tmp_path):
    uri, client = sqlite_store
    tracking.experiment_id(client, f"beam_search/{model_dir}")
    cmd = [sys.executable, "-m", "search.beam", *argv(model_dir, uri, "--max_removed", "2", "--storage", postgres_db)]
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    workers = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=log.open("w")) for log in logs]
    for proc, log in zip(workers, logs):
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
        shown = log.read_text().splitlines()  # every step's progress line, logged under search.beam
        steps = {" ".join(line.split()[:5]).rstrip(":") for line in shown if line.startswith("beam step ")}
        assert sorted(steps) == ["beam step 1 of 2", "beam step 2 of 2"], shown

    statuses = assert_each_config_once(client)
    assert set(statuses) == {"FINISHED"}
    results = finished_results(client)
    assert len(results) == 3
    same = [{k: v for k, v in r.items() if k != "worker"} for r in results]  # run ids included
    assert same[1] == same[0] and same[2] == same[0]
    assert_close(comparable(results[0]), comparable(reference[0], steps=2))
    steps = [tracking.load_json(client, results[0]["worker"]["parent_run_id"], f"beam_step{k}.json") for k in (1, 2)]
    assert statuses["FINISHED"] == 1 + sum(len(s["candidates"]) for s in steps) == sum(r["worker"]["evaluated"] for r in results)
    hashes = [r.data.tags["config_hash"] for r in runs(client, "config")]
    engine = sa.create_engine(postgres_db)
    table = sa.Table(work.TABLE, sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        claims = [tuple(row) for row in conn.execute(sa.select(table.c.config_hash, table.c.status))]
    engine.dispose()
    assert sorted(claims) == sorted((h, "done") for h in hashes)


def test_out_of_memory_retries_with_half_the_batch_size(model_dir, reference, sqlite_store, monkeypatch):
    uri, client = sqlite_store
    plain, calls = Evaluator._score_config, []

    def flaky(self, chunk, removed, *args):
        calls.append((removed, self.batch_size))
        if removed == (Unit(2),) and [c for c, _ in calls].count((Unit(2),)) == 1:  # configurations arrive normalized
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return plain(self, chunk, removed, *args)

    monkeypatch.setattr(pruning.evaluate.Evaluator, "_score_config", flaky)
    assert run_main(beam.main, argv(model_dir, uri, "--max_removed", "1", "--criterion", "mean")) == 0
    first = calls.index(((Unit(2),), 16))
    assert ((Unit(2),), 8) in calls[first + 1 :]  # the whole set again, at half the batch size
    assert {size for _, size in calls[: first + 1]} == {16} and {size for _, size in calls[first + 1 :]} == {8}
    (results,) = finished_results(client)  # the same scores as without the failure
    assert_close(comparable(results, 1)["recommendations"], comparable(reference[0], 1)["recommendations"])
    assert_close(results["baseline"], reference[0]["baseline"])
    for block in range(N_BLOCKS):  # the step's set failed together and was scored again together
        oom = [r for r in runs(client, "config") if r.data.tags["removed_blocks"] == str(block)]
        assert [r.info.status for r in oom] == ["FAILED", "FINISHED"]
        assert oom[0].data.tags[names.ERROR].startswith("OutOfMemoryError: CUDA out of memory")


def test_configuration_that_keeps_failing_is_recorded_and_reported(model_dir, sqlite_store, monkeypatch, capsys):
    uri, client = sqlite_store
    plain = Evaluator._score_config

    def broken(self, chunk, removed, *args):
        if removed == (Unit(1),):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return plain(self, chunk, removed, *args)

    monkeypatch.setattr(pruning.evaluate.Evaluator, "_score_config", broken)
    args = argv(model_dir, uri, "--max_removed", "1", "--criterion", "mean", "--retries", "1")
    assert run_main(beam.main, args) == 0
    (results,) = finished_results(client)
    (failed,) = results["failed"]
    assert failed["removed_blocks"] == [1] and failed["step"] == 1
    assert failed["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert [e["complete"] for e in results["recommendations"]] == [False]
    parent = runs(client, "beam_search")[0]
    step1 = tracking.load_json(client, parent.info.run_id, "beam_step1.json")
    assert [1] not in [e["removed_blocks"] for e in step1["beams"]["mean"]]
    assert [r["removed_blocks"] for r in step1["failed"]] == [[1]]
    assert parent.data.tags["prunetrack.failed_configs"] == "1" and parent.data.metrics["configs_failed"] == 1
    attempts = [r for r in runs(client, "config") if r.data.tags["removed_blocks"] == "1"]
    assert [r.info.status for r in attempts] == ["FAILED", "FAILED"]
    assert all("illegal memory access" in r.data.tags[names.ERROR] for r in attempts)
    err = capsys.readouterr()
    assert "remove[1] failed 2 times, recorded FAILED" in err.err and "FAILED configurations (1)" in err.out

    monkeypatch.undo()  # the same command later: the failed configuration is evaluated again
    assert run_main(beam.main, args) == 0
    again = finished_results(client)[-1]
    assert again["failed"] == [] and all(e["complete"] for e in again["recommendations"])
    retried = [r for r in runs(client, "config") if r.data.tags["removed_blocks"] == "1"]
    assert [r.info.status for r in retried] == ["FAILED", "FAILED", "FINISHED"]


def test_claims_are_exclusive_and_taken_over_from_dead_or_silent_owners(tmp_path):
    path = str(tmp_path / "claims.db")
    first, second = work.Claims(path), work.Claims(path)
    assert first.take("h1", None) and not second.take("h1", None)
    table = first.table

    def set_owner(owner: str, heartbeat: float) -> work.Claim:
        with first.engine.begin() as conn:
            conn.execute(sa.update(table).values(owner=owner, heartbeat=heartbeat))
        return second.rows(["h1"])["h1"]

    assert second.alive(set_owner("elsewhere:123:abcd", time.time()))
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not second.alive(set_owner(f"{socket.gethostname()}:{dead.pid}:abcd", time.time()))
    silent = set_owner("elsewhere:123:abcd", time.time() - work.STALE_S - 1)
    assert not second.alive(silent)
    assert second.take("h1", silent) and not first.take("h1", silent)  # one winner
    first.settle("h1", "boom")  # no longer its claim: nothing changes
    second.settle("h1", "RuntimeError: boom")
    claim = first.rows(["h1"])["h1"]
    assert (claim.status, claim.error, claim.owner) == ("failed", "RuntimeError: boom", second.owner)
    with pytest.raises(SearchError, match="cannot use storage 'postgresql://postgres:\\*\\*\\*@127.0.0.1:1/x'"):
        work.Claims("postgresql://postgres:secret@127.0.0.1:1/x")


def test_a_dead_workers_claim_is_taken_over_while_a_survivor_scores(tmp_path, sqlite_store, monkeypatch):
    """A survivor busy with its own claimed set takes over a dead worker's claim within a poll, not
    after its set: the claim becomes its own and the dead worker's run KILLED while it scores; the
    configuration is scored in its next round."""
    from types import SimpleNamespace

    from search.configs import Outcome

    _, client = sqlite_store
    exp_id = tracking.experiment_id(client, "beam_search/m")
    dead = subprocess.Popen(["true"])
    dead.wait()
    ctx = SimpleNamespace(client=client, counts={"reused": 0}, hash_of=lambda removed: f"hash-{removed[0]}")
    seen, rounds = {}, []

    def evaluate(self, configs, race=None, race_key=None):
        rounds.append(list(configs))
        if len(rounds) == 1:  # the survivor's own set: it scores until the dead worker's claim is its own
            deadline = time.monotonic() + 30
            while client.get_run(orphan).info.status == "RUNNING":
                assert time.monotonic() < deadline, "the dead worker's run was not closed while the survivor scored"
                time.sleep(0.1)
            seen["owner"] = self.claims.rows(["hash-2"])["hash-2"].owner
        return {c: Outcome(c, ctx.hash_of(c)) for c in configs}

    monkeypatch.setattr(work.Worker, "evaluate", evaluate)
    with work.Claims(str(tmp_path / "claims.db")) as claims:
        assert claims.take("hash-2", None)  # the dead worker's claim, and its run left RUNNING
        with claims.engine.begin() as conn:
            conn.execute(claims.table.update().values(owner=f"{socket.gethostname()}:{dead.pid}:dead"))
        tags = {names.CONFIG_HASH: "hash-2", names.HOST: socket.gethostname(), names.PID: str(dead.pid)}
        orphan = client.create_run(exp_id, tags=tags).info.run_id
        worker = work.Worker(ctx, retries=0, retry_delay=0, claims=claims, claim_size=1)
        # claim_size 1: the survivor claims (1,) and scores it; the dead worker's (2,) is left to the takeover
        outcomes = worker.run([(1,), (2,)])
    assert rounds == [[(1,)], [(2,)]] and set(outcomes) == {(1,), (2,)}
    assert seen["owner"] == claims.owner  # taken over while the survivor was still scoring its own set
    assert client.get_run(orphan).info.status == "KILLED"
    assert "stopped before finishing" in client.get_run(orphan).data.tags[names.ERROR]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--beam_width", "0"], "error: beam_width must be at least 1, got 0"),
        (["--max_removed", "-1"], "error: max_removed must be at least 1, got -1"),
        (["--criterion", "median"], "error: unknown criterion 'median'; allowed: mean, all, pydoc_ppl, pydoc_cloze"),
        (["--protect", "0,x"], "error: protect '0,x' is not a list of block indices; allowed: e.g. 0,29 or 0-3,29"),
        (["--protect", "0,9"], "error: protect block 9 out of range; allowed: 0..5"),
        (["--min_active_blocks", "6"], "error: nothing to remove from 6 blocks with min_active_blocks=6"),
        (["--storage", "postgresql://nobody@127.0.0.1:1/x"], "error: cannot use storage 'postgresql://nobody@127.0.0.1:1/x'"),
    ],
)
def test_bad_input_is_one_line_before_any_evaluation(model_dir, sqlite_store, capsys, extra, message):
    uri, client = sqlite_store
    assert run_main(beam.main, argv(model_dir, uri, *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert runs(client, "config") == []


@pytest.mark.slow
@pytest.mark.service
def test_mlflow_run_beam_search_end_to_end(sqlite_store, tmp_path):
    """`mlflow run . -e beam_search --env-manager local` on the default model, blocks 27..29 removable."""
    uri, client = sqlite_store
    params = ("tasks=pydoc_ppl", "n_samples=2", "protect=0-26", "max_removed=2", "beam_width=2")
    done = mlflow_run(uri, "beam_search", *params, cwd=tmp_path, env=ENV, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    (parent,) = runs(client, "beam_search", "FINISHED")
    assert parent.data.params["beam_width"] == "2" and parent.data.params["protect"] == "0-26"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"beam_step1.json", "beam_step2.json", names.BEAM_RESULTS, "recommendations.md"} <= artifacts
    results = tracking.load_json(client, parent.info.run_id, names.BEAM_RESULTS)
    first, second = results["recommendations"]
    assert len(first["removed_blocks"]) == 1 and set(first["removed_blocks"]) <= {27, 28, 29}
    assert len(second["active_blocks"]) == 28 and set(second["removed_blocks"]) <= {27, 28, 29}
    assert results["num_active_blocks"]["30"] == list(range(30)) and results["num_active_blocks"]["28"] == second["active_blocks"]
    children = runs(client, "config")
    assert all(r.info.status == "FINISHED" for r in children)
    assert len(children) == 1 + 3 + 3  # the baseline, 3 single blocks, the 3 pairs of 27..29
    assert "| 2 |" in done.stdout and "28 -> [" in done.stdout
