"""Racing: the stop rule on constructed per-example results, and step-wide scoring with a race on
a model whose blocks are known to matter or not."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_evaluate import mc_task, tiny

from benchmarks.racing_step import per_example_values, replay
from pruning.evaluate import Evaluator, look_sizes
from pruning.racing import Beam, Race
from pruning.tasks import MultipleChoice, Task


def fake_evaluator(n: int, n_looks: int = 3):
    examples = [MultipleChoice(i, (("c", " a"), ("c", " b")), 0, (2.0, 2.0)) for i in range(n)]
    task = Task("t", "validation", "multiple_choice", examples, source="generated")
    return SimpleNamespace(tasks=[task], tokens=[[1] * n], n_looks=n_looks)


def lls_with(correct: list[bool]) -> list[dict]:
    """Request log-likelihoods per example: gold (choice 0) wins where `correct`."""
    return [{e: np.array([0.0, -1.0] if ok else [-1.0, 0.0]) for e, ok in enumerate(correct)}]


def race(width: int, members) -> Race:
    return Race([Beam({"t": 1.0}, set(members))], width, alpha=0.05)


def test_a_confidently_worse_configuration_stops_and_close_ones_do_not():
    rng = random.Random(0)
    good = [rng.random() < 0.8 for _ in range(40)]
    close = [ok if rng.random() < 0.9 else not ok for ok in good]
    bad = [rng.random() < 0.2 for _ in range(40)]
    lls = {(1,): lls_with(good), (2,): lls_with(good), (3,): lls_with(close), (4,): lls_with(bad)}
    ev = fake_evaluator(200)
    stopped = race(2, lls).stop(ev, lls)
    assert list(stopped) == [(4,)]
    assert "worse than 3 others" in stopped[(4,)] and "40/200 t" in stopped[(4,)]
    assert "alpha 0.05 / 8 " in stopped[(4,)]  # 1 beam x width 2 x 2 others x 2 looks that can stop
    # the family is the beam's candidates at the start of the step: two stopped earlier still count
    wider = Race([Beam({"t": 1.0}, set(lls) | {(5,), (6,)})], 2, alpha=0.05)
    assert "alpha 0.05 / 16 " in wider.stop(ev, lls)[(4,)]
    assert list(race(3, lls).stop(ev, lls)) == [(4,)]  # 3 others are confidently better
    assert race(4, lls).stop(ev, lls) == {}  # all fit in the beam
    # fewer examples than the first look needs: nobody stops, however clear
    few = {c: [{e: v[0][e] for e in range(20)}] for c, v in lls.items()}
    assert race(2, lls).stop(fake_evaluator(200), few) == {}


def test_a_configuration_in_another_beam_runs_on():
    bad, good = [False] * 40, [True] * 40
    lls = {(1,): lls_with(good), (2,): lls_with(good), (3,): lls_with(good), (4,): lls_with(bad)}
    ev = fake_evaluator(100)
    both = Race([Beam({"t": 1.0}, {(1,), (2,), (3,), (4,)}), Beam({"t": 1.0}, {(4,)})], 2)
    assert both.stop(ev, lls) == {}  # (4,) is the only member of the second beam
    assert list(race(2, lls).stop(ev, lls)) == [(4,)]


def test_identical_results_never_stop():
    same = [True, False] * 20
    lls = {(b,): lls_with(same) for b in range(6)}
    assert race(1, lls).stop(fake_evaluator(40 * 10), lls) == {}


@pytest.fixture(scope="module")
def one_block_matters():
    """A 4-block Llama whose blocks 1-3 add nothing (zero output projections): removing them
    changes no score; removing block 0 does. Gold answers are the full model's own choices."""
    loaded = tiny("llama", layers=4)
    with torch.no_grad():
        for block in loaded.blocks[1:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        for p in loaded.blocks[0].parameters():
            p.mul_(4.0)
    task = mc_task(200, seed=5)
    scores = Evaluator(loaded, [task], 8, max_length=64).evaluate(())[task.name]
    gold = [int(np.argmax(ll)) for ll in scores.per_example["loglikelihoods"]]
    task.examples = [MultipleChoice(ex.doc_id, ex.requests, g, ex.choice_lengths) for ex, g in zip(task.examples, gold)]
    return loaded, task


def test_racing_stops_the_harmful_removal_and_leaves_exact_survivors(one_block_matters):
    loaded, task = one_block_matters
    configs = [(0,), (1,), (2,), (3,)]
    exhaustive = Evaluator(loaded, [task], 8, max_length=64).evaluate_many(configs)
    assert exhaustive[(0,)].scores[task.name].metrics["acc"] < 0.8
    assert all(exhaustive[(b,)].scores[task.name].metrics["acc"] == 1.0 for b in (1, 2, 3))
    raced = Evaluator(loaded, [task], 8, max_length=64).evaluate_many(configs, race=race_on(task, configs))
    assert raced[(0,)].stopped and raced[(0,)].scores[task.name].n == look_sizes(200)[0] == 32
    for b in (1, 2, 3):
        assert raced[(b,)].stopped is None
        assert raced[(b,)].scores[task.name].per_example == exhaustive[(b,)].scores[task.name].per_example
    assert sum(r.n_examples for r in raced.values()) == 3 * 200 + 32
    # a race replayed on the exhaustive per-example results stops what racing stopped (benchmarks.racing_step)
    lls = {c: [per_example_values(r.scores[task.name])] for c, r in exhaustive.items()}
    replayed = replay(Evaluator(loaded, [task], 8, max_length=64), lls, race_on(task, configs), [(1,), (2,), (3,), (0,)], 2)
    assert replayed["example_configs"] == 3 * 200 + 32 and replayed["stopped_at_look"] == {"0": 1} and replayed["same_beam"]


def race_on(task, configs) -> Race:
    return Race([Beam({task.name: 1.0}, set(configs))], 2)


def test_beam_search_records_stops_apart_and_reuses_them(one_block_matters, sqlite_store):
    from dataclasses import asdict

    from contract import tracking
    from search import beam
    from search.configs import StudyContext, task_identity
    from search.work import Worker

    loaded, task = one_block_matters
    _, client = sqlite_store

    def search(racing: bool):
        with tracking.study_run(client, "beam_search", "beam_search/one-block-matters", {}) as (run_id, exp_id):
            ctx = StudyContext(
                client,
                exp_id,
                run_id,
                Evaluator(loaded, [task], 8, max_length=64),
                {"model": "one-block-matters", "tasks": [task_identity(task)], "split": task.split, "n_samples": None},
            )
            settings = beam.Settings(2, 1, 1, (), "mean", racing)
            results = beam.run_beam_search(
                ctx, Worker(ctx, 0, 0), settings, tracking.config_hash({**ctx.identity, **asdict(settings)})
            )
            return ctx, results

    ctx, raced = search(True)
    assert raced.worker["stopped"] == 1 and raced.worker["evaluated"] == 4
    assert raced.worker["examples_scored"] == 4 * 200 + 32
    assert raced.recommendations[0].removed_blocks == [1]
    parent = client.get_run(ctx.parent_id)
    assert parent.data.tags["recommended/1"] == "1" and parent.data.metrics["configs_stopped"] == 1
    assert "beam_drops.png" in {a.path for a in client.list_artifacts(ctx.parent_id)}
    (stop,) = client.search_runs([ctx.experiment_id], "tags.`prunetrack.stopped` = 'racing'")
    assert stop.data.tags["removed_blocks"] == "0" and stop.data.metrics[f"n_{task.name}"] == 32
    assert stop.data.tags["config_hash"] != ctx.hash_of((0,))
    assert "worse than 3 others" in stop.data.tags["prunetrack.stopped_reason"]
    step = tracking.load_json(client, ctx.parent_id, "beam_step1.json")
    assert step["stopped"] == [[0]]
    (row,) = [r for r in step["candidates"] if r["removed_blocks"] == [0]]
    assert row["status"] == "STOPPED" and row["drops"] is None and row["n_examples"] == {task.name: 32}

    _, again = search(True)  # the same search again: everything, the stop included, comes from the store
    assert again.worker["reused"] == 5 and again.worker["evaluated"] == again.worker["examples_scored"] == 0
    _, exhaustive = search(False)  # the stopped configuration's partial run is never taken for a full one
    assert exhaustive.worker["evaluated"] == 1 and exhaustive.worker["examples_scored"] == 200
    assert exhaustive.recommendations == raced.recommendations
