"""Sublayers as removal units through the search: hashes of block configurations unchanged, sublayer
sensitivity and beam search against an independent reference, the parameter budget, records, bad input."""

import numpy as np
import pytest
from helpers import runs
from mlflow.tracking import MlflowClient

from contract import names, tracking
from contract.records import BeamStep, Candidate, Recommendation, SensitivityReport
from pruning.drop import drop
from pruning.evaluate import Evaluator
from pruning.families import removed_parameters
from pruning.models import load_model
from pruning.tasks import load_task
from pruning.units import Unit, all_units, label, normalize
from search import beam, sensitivity
from search.cli import run_main
from search.configs import StudyContext

pytestmark = pytest.mark.usefixtures("one_thread", "scratch_cwd")  # tests/conftest.py

TASKS = ["pydoc_ppl", "pydoc_cloze"]
N_BLOCKS, WIDTH, STEPS = 4, 2, 3


def common(model: str, uri: str, *extra: str) -> list[str]:
    return ["--model", model, "--tasks", ",".join(TASKS), "--n_samples", "4", "--batch_size", "16", "--tracking_uri", uri, *extra]


def test_whole_block_configurations_keep_their_hash():
    # hashes computed by search.configs at commit 31499a9 (before units) for this identity
    identity = {
        "model": "SmolLM2-135M-Instruct",
        "revision": "local",
        "dtype": "float32",
        "tasks": [{"name": "piqa", "split": "validation", "n": 32, "data": "0123456789abcdef"}],
        "split": "validation",
        "n_samples": 32,
        "seed": 0,
        "sample": "seeded",
    }
    ctx = StudyContext(None, "0", "p", None, identity)
    assert ctx.hash_of(()) == "cce5ec99d4bdfeb8"
    assert ctx.hash_of(normalize([3])) == "8402f24c39387544"
    assert ctx.hash_of(normalize(["b3", "a5", "m5"])) == "54de5865f434c371"  # a5 + m5 is block 5
    assert ctx.hash_of(normalize([3, 5]), "key/step2") == "8f682741738f1e68"
    assert ctx.hash_of(normalize(["a3"])) not in {ctx.hash_of(normalize(["m3"])), ctx.hash_of(normalize([3]))}


def test_records_of_blocks_still_load_and_carry_units():
    old = {"removed_blocks": [1, 3], "config_hash": "h", "run_id": None, "status": "FINISHED", "metrics": None}
    assert Candidate.from_json(old).units == (Unit(1), Unit(3))
    new = Candidate([3], "h", None, "FINISHED", None, removed_units=["a1", "b3"])
    assert Candidate.from_json(new.to_json()).units == (Unit(1, "a"), Unit(3))
    entry = Recommendation(1, [], 0.1, 0.0, 2, 0.1, 4, [0, 1, 2, 3], {}, "h", None, True)
    assert Recommendation.from_json(entry.to_json()).units == () and "removed_units" not in entry.to_json()
    step = BeamStep.from_json({"step": 2, "candidates": [], "beams": {}, "failed": [], "stopped": [[0, 2], ["a1", "m3"]]})
    assert step.stopped_units == [(Unit(0), Unit(2)), (Unit(1, "a"), Unit(3, "m"))]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir(layers=N_BLOCKS, initializer_range=0.3)


@pytest.fixture(scope="module")
def table(model_dir):
    """Drop per task of a configuration, evaluated directly (memoized), and the parameters it removes."""
    loaded = load_model(model_dir)
    tasks = [load_task(t, "validation", 4, 0) for t in TASKS]
    evaluator = Evaluator(loaded, tasks, 16)
    base = {t: s.metrics for t, s in evaluator.evaluate(()).items()}
    memo = {}

    def drops(config) -> dict[str, float]:
        if config not in memo:
            scores = evaluator.evaluate(config)
            memo[config] = {t.name: drop(t, base[t.name], scores[t.name].metrics) for t in tasks}
        return memo[config]

    return drops, lambda config: removed_parameters(loaded, config)


def test_sublayer_sensitivity_then_beam_search(model_dir, table, sqlite_store):
    uri, client = sqlite_store
    drops, _ = table
    assert run_main(sensitivity.main, common(model_dir, uri, "--removal_unit", "sublayer")) == 0
    (parent,) = runs(client, "sensitivity", "FINISHED")
    report = SensitivityReport.from_json(tracking.load_json(client, parent.info.run_id, names.SENSITIVITY_REPORT))
    for task in TASKS:
        for kind, name in (("a", names.importance_attn(task)), ("m", names.importance_mlp(task))):
            history = sorted(client.get_metric_history(parent.info.run_id, name), key=lambda m: m.step)
            expected = [drops((Unit(i, kind),))[task] for i in range(N_BLOCKS)]
            assert [m.step for m in history] == list(range(N_BLOCKS))
            assert np.allclose([m.value for m in history], expected, rtol=1e-9, atol=1e-12)
        assert np.allclose(report.importance_attn[task], [drops((Unit(i, "a"),))[task] for i in range(N_BLOCKS)])
        assert np.allclose(report.importance[task], [drops((Unit(i),))[task] for i in range(N_BLOCKS)])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {names.SUBLAYER_IMPORTANCE_PLOT, names.IMPORTANCE_PLOT} <= artifacts
    config_runs = runs(client, "config", "FINISHED")
    assert len(config_runs) == 1 + 3 * N_BLOCKS
    tags = {(r.data.tags[names.REMOVED_UNITS], r.data.tags[names.REMOVED_BLOCKS]) for r in config_runs}
    assert {("a2", ""), ("m0", ""), ("b3", "3"), ("", "")} <= tags

    # the beam over the 2L sublayers: step 1 is the sensitivity's, a block's two sublayers are the block's run
    argv = common(model_dir, uri, "--removal_unit", "sublayer", "--beam_width", str(WIDTH), "--max_removed", str(STEPS))
    assert run_main(beam.main, [*argv, "--criterion", "mean", "--retry_delay", "0"]) == 0
    (search,) = runs(client, "beam_search", "FINISHED")
    results = tracking.load_json(client, search.info.run_id, names.BEAM_RESULTS)
    assert results["worker"]["reused"] >= 1 + 2 * N_BLOCKS
    mean = lambda config: float(np.mean(list(drops(config).values())))  # noqa: E731
    kept = [()]
    sublayers = [u for u in all_units(N_BLOCKS, "sublayer")]
    for k in range(1, STEPS + 1):  # the reference beam, written out independently of search.beam
        grown = {normalize((*c, u)) for c in kept for u in sublayers} - set(kept)
        kept = sorted(grown, key=lambda c: (mean(c), c))[:WIDTH]
        step = BeamStep.from_json(tracking.load_json(client, search.info.run_id, names.beam_step(k)))
        assert {c.units for c in step.candidates} == grown
        assert [normalize(e["removed_units"]) for e in step.beams["mean"]] == kept
        assert results["recommendations"][k - 1]["removed_units"] == [str(u) for u in kept[0]]
        assert results["recommendations"][k - 1]["mean_drop"] == pytest.approx(mean(kept[0]))
    labels = {r.data.tags[names.REMOVED_UNITS] for r in runs(client, "config")}
    assert all(label(normalize(t.split(",") if t else [])) == t for t in labels)


def test_both_units_within_a_parameter_budget(model_dir, table, sqlite_store):
    uri, client = sqlite_store
    _, params = table
    block = params((Unit(0),))
    argv = common(model_dir, uri, "--removal_unit", "both", "--beam_width", "2", "--max_removed", "8", "--criterion", "mean")
    assert run_main(beam.main, [*argv, "--max_params_removed_frac", "0.25"]) == 0  # one block of four
    (search,) = runs(client, "beam_search", "FINISHED")
    results = tracking.load_json(client, search.info.run_id, names.BEAM_RESULTS)
    steps = len(results["recommendations"])
    assert 1 <= steps < 8  # stopped when nothing more fits
    for k in range(1, steps + 1):
        step = BeamStep.from_json(tracking.load_json(client, search.info.run_id, names.beam_step(k)))
        assert all(params(c.units) <= block for c in step.candidates) and step.candidates
    assert step.step == steps and results["recommendations"][-1]["params_removed"] <= block
    kinds = {
        u.kind
        for k in range(1, 2)
        for c in BeamStep.from_json(tracking.load_json(client, search.info.run_id, names.beam_step(k))).candidates
        for u in c.units
    }
    assert kinds == {"a", "m", "b"}


def test_a_family_without_adapters_is_one_line(tiny_model_dir, sqlite_store, capsys):
    uri, client = sqlite_store
    model = tiny_model_dir("bloom", layers=2)
    capsys.readouterr()
    assert run_main(sensitivity.main, common(model, uri, "--removal_unit", "sublayer")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bar
    assert len(err) == 1 and err[0].startswith("error: ") and "'bloom'" in err[0] and "llama" in err[0]
    assert runs(client, "config") == []
    assert run_main(sensitivity.main, common(model, uri)) == 0  # whole blocks need no adapter
    bad = common(model, uri, "--removal_unit", "head")
    assert run_main(sensitivity.main, bad) == 2 and "removal_unit" in capsys.readouterr().err
    client = MlflowClient(uri)
    assert len(runs(client, "config", "FINISHED")) == 3


def test_one_shot_picks_at_the_parameter_budget_of_blocks(model_dir):
    import sys

    from helpers import ROOT

    sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package
    from benchmarks.sublayer_budget import picks

    loaded = load_model(model_dir)
    by_block = {"t": [0.4, 0.1, 0.3, 0.2]}
    report = SensitivityReport({}, N_BLOCKS, by_block, {}, by_block["t"], {}, {})
    report.importance_attn, report.importance_mlp = {"t": [0.5, 0.0, 0.01, 0.02]}, {"t": [0.6, 0.3, 0.9, 0.03]}
    chosen = picks(report, loaded, 1)
    assert chosen["blocks"] == (Unit(1),)
    budget = removed_parameters(loaded, (Unit(1),))
    assert removed_parameters(loaded, chosen["sublayers"]) <= budget
    assert chosen["sublayers"][:2] == (Unit(1, "a"), Unit(2, "a"))  # the least important sublayers first
