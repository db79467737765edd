"""Criteria, procedures and the held-out comparison of methods (search.compare, analysis.compare_methods)
on a tiny random Llama: Block Influence and angular distance from the baseline pass equal a direct
computation, procedures choose what they say, selection and scoring never share examples, reruns reuse
every configuration, the report has its keys, and bad input is one line with exit code 2."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import runs
from torch.nn import functional as F

from analysis import compare_methods
from contract import names, tracking
from pruning import criteria
from pruning.criteria import CriterionError, Inputs
from pruning.criteria.states import BlockStates
from pruning.evaluate import Evaluator
from pruning.models import load_model
from pruning.tasks import load_task
from pruning.units import Unit
from search import beam, compare, procedures
from search.cli import run_main

N_BLOCKS = 5
pytestmark = pytest.mark.usefixtures("one_thread", "scratch_cwd")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir(layers=N_BLOCKS, initializer_range=0.3)


def test_block_states_of_the_baseline_pass_are_block_influence_and_angular_distance(model_dir):
    loaded = load_model(model_dir, device="cpu")
    evaluator = Evaluator(loaded, [load_task("pydoc_ppl", "validation", 3, 0)], batch_size=2, max_length=64)
    states = evaluator.observer = BlockStates(N_BLOCKS)
    evaluator.evaluate(())
    distance, tokens, last = torch.zeros(N_BLOCKS, dtype=torch.float64), 0, [[] for _ in range(N_BLOCKS + 1)]
    with torch.no_grad():
        for chunk in evaluator.chunks:
            for batch in chunk.prepared.batches:
                hidden = loaded.model(
                    batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
                ).hidden_states
                mask = batch.attention_mask.bool()
                tokens += int(mask.sum())
                ends = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
                for j in range(N_BLOCKS):
                    out = hidden[j + 1] if j < N_BLOCKS - 1 else None
                    if out is not None:  # HF applies the final norm to the last hidden state: compare blocks 0..L-2
                        distance[j] += (1 - F.cosine_similarity(hidden[j], out, dim=-1))[mask].sum()
                for j in range(N_BLOCKS):
                    last[j].append(hidden[j][torch.arange(len(ends)), ends])
    assert states.tokens == tokens
    np.testing.assert_allclose(states.influence()[:-1], (distance / tokens)[:-1].tolist(), rtol=1e-4)
    units = tuple(Unit(b) for b in range(N_BLOCKS))
    inputs = Inputs(N_BLOCKS, states=states)
    two = criteria.score("angular_distance", inputs, (), units, n=2)
    cos = F.cosine_similarity(torch.cat(last[1]).double(), torch.cat(last[3]).double(), dim=-1)
    assert two[Unit(1)] == pytest.approx(float((torch.arccos(cos) / math.pi).mean()), rel=1e-4)
    assert math.isinf(two[Unit(N_BLOCKS - 1)])  # a window of 2 from the last block passes the end
    best = min(range(N_BLOCKS - 1), key=lambda b: two[Unit(b)])
    assert procedures.one_shot("angular_distance", inputs, units, 2)[1] == (Unit(best), Unit(best + 1))
    bi = criteria.score("block_influence", inputs, (), units + (Unit(0, "a"), Unit(0, "m")))
    assert bi[Unit(0, "a")] > 0 and bi[Unit(0, "m")] > 0
    with pytest.raises(CriterionError, match="scores the unpruned model only"):
        criteria.score("block_influence", inputs, (Unit(1),), units)


def test_taylor_scores_add_up_over_a_blocks_weights(model_dir):
    from pruning.criteria import taylor

    loaded = load_model(model_dir, device="cpu")
    text = load_task("pydoc_ppl", "validation", 3, 0).examples[0].text
    scores = taylor.unit_scores(loaded, text)
    for b in range(N_BLOCKS):
        block, attn, mlp = scores[Unit(b)], scores[Unit(b, "a")], scores[Unit(b, "m")]
        assert 0 < attn + mlp < block  # the block also has its two norms' weights
    assert not any(p.requires_grad is False for p in loaded.model.parameters())  # flags restored
    assert all(p.grad is None for p in loaded.model.parameters())


def test_procedures_rank_once_take_the_last_blocks_and_refuse_what_they_cannot_do():
    inputs = Inputs(6, taylor={Unit(b): s for b, s in enumerate([5.0, 1.0, 4.0, 0.5, 3.0, 9.0])})
    units = tuple(Unit(b) for b in range(6))
    assert procedures.one_shot("taylor", inputs, units, 3) == [(Unit(3),), (Unit(1), Unit(3)), (Unit(1), Unit(3), Unit(4))]
    assert procedures.last_n(6, 2) == [(Unit(4),), (Unit(3), Unit(4))]
    with pytest.raises(procedures.ProcedureError, match="unknown procedure 'best'; allowed: beam, greedy, one_shot, last_n"):
        procedures.check("drop", "best")
    with pytest.raises(procedures.ProcedureError, match="procedure greedy re-scores after each removal"):
        procedures.check("block_influence", "greedy")
    with pytest.raises(CriterionError, match="unknown criterion 'cka'; allowed: drop, ppl_drop"):
        procedures.check("cka", "one_shot")


def test_todays_beam_key_is_unchanged():
    settings = beam.Settings(3, 4, 1, (), "all")
    identity = {"model": "m"}
    old = tracking.config_hash(
        {
            **identity,
            "beam_width": 3,
            "max_removed": 4,
            "min_active_blocks": 1,
            "protect": (),
            "criterion": "all",
            "racing": True,
            "racing_alpha": 0.05,
        }
    )
    assert tracking.config_hash({**identity, **settings.key()}) == old
    assert tracking.config_hash({**identity, **beam.Settings(3, 4, 1, (), "taylor", procedure="one_shot").key()}) != old


def select_args(model_dir, uri, *extra):
    return [
        "--model",
        model_dir,
        "--tasks",
        "pydoc_ppl,pydoc_cloze",
        "--n_samples",
        "6",
        "--ppl_docs",
        "2",
        "--batch_size",
        "8",
        "--max_k",
        "2",
        "--tracking_uri",
        uri,
        *extra,
    ]


def test_methods_select_on_one_half_score_on_the_other_and_rerun_reuses_everything(model_dir, sqlite_store, tmp_path):
    uri, client = sqlite_store
    methods = ["--methods", "drop:greedy,ppl_drop:one_shot,block_influence:one_shot,taylor:one_shot,last_n"]
    assert run_main(compare.main, select_args(model_dir, uri, *methods)) == 0
    (run,) = runs(client, names.METHOD_SELECTION, "FINISHED")
    report = tracking.load_json(client, run.info.run_id, names.METHOD_SELECTION_REPORT)
    assert report["select_split"] == "validation/a" and report["score_split"] == "validation/b"
    assert report["selected"]["last_n"] == [["b3"], ["b2", "b3"]]
    history = client.get_metric_history(run.info.run_id, names.criterion_metric("block_influence", "a"))
    assert sorted(m.step for m in history) == list(range(N_BLOCKS))
    scored = {r for rs in report["score_runs"].values() for r in rs}
    for run_id in scored:
        assert client.get_run(run_id).data.params["split"] == "validation/b"
    configs = len(runs(client, names.CONFIG))
    assert run_main(compare.main, select_args(model_dir, uri, *methods)) == 0
    assert len(runs(client, names.CONFIG)) == configs  # everything reused by hash
    out = tmp_path / "out"
    assert run_main(compare_methods.main, ["--tracking_uri", uri, "--n_resamples", "50", "--output_dir", str(out)]) == 0
    result = json.loads((out / names.COMPARE_JSON).read_text())
    assert {"methods", "k", "scores", "ci", "criterion_correlation"} <= set(result)
    assert result["k"] == [1, 2] and set(result["scores"]) == set(report["methods"])
    best = result["ci"]["1"]["best"]
    assert result["ci"]["1"]["methods"][best]["diff_ci"] == [0.0, 0.0]
    assert set(result["criterion_correlation"]) == {"ppl_drop", "block_influence", "angular_distance", "taylor"}
    assert (out / names.COMPARE_PLOT).stat().st_size > 0 and "tab:compare-methods" in (out / names.COMPARE_TABLE).read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "cka:one_shot"], "error: unknown criterion 'cka'; allowed: drop, ppl_drop"),
        (["--methods", "drop:best"], "error: unknown procedure 'best'; allowed: beam, greedy, one_shot, last_n"),
        (["--score_split", "validation", "--select_split", "validation/a"], "error: select_split 'validation/a' and score_split"),
        (["--max_k", "5"], "error: max_k 5 is beyond the units of this model; allowed: 1..4"),
        (["--tasks", "pydoc_cloze", "--methods", "ppl_drop:one_shot"], "error: criterion ppl_drop needs calibration text"),
    ],
)
def test_bad_input_is_one_line(model_dir, sqlite_store, capsys, extra, message):
    uri, client = sqlite_store
    assert run_main(compare.main, select_args(model_dir, uri, *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert runs(client, names.CONFIG) == []


def test_beam_search_takes_a_criterion_and_a_procedure(model_dir, sqlite_store, capsys):
    uri, client = sqlite_store
    common = ["--model", model_dir, "--tasks", "pydoc_ppl,pydoc_cloze", "--n_samples", "4", "--tracking_uri", uri]
    extra = ["--criterion", "block_influence", "--procedure", "one_shot", "--max_removed", "2"]
    assert run_main(beam.main, [*common, *extra]) == 0
    (parent,) = runs(client, names.BEAM_SEARCH, "FINISHED")
    results = tracking.load_json(client, parent.info.run_id, names.BEAM_RESULTS)
    first, second = (e["removed_blocks"] for e in results["recommendations"])
    influence = [
        m.value for m in sorted(client.get_metric_history(parent.info.run_id, "criterion/block_influence"), key=lambda m: m.step)
    ]
    assert first == [int(np.argmin(influence))] and set(first) < set(second)
    assert run_main(beam.main, [*common, "--criterion", "taylor", "--procedure", "greedy"]) == 2
    assert "error: procedure greedy re-scores after each removal" in capsys.readouterr().err
