"""Model loading, block removal, tasks and scoring on tiny random models and the default model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import mlflow_run, runs, tiny_lm

from pruning.encoding import encode_request, rolling_windows
from pruning.evaluate import Evaluator
from pruning.models import LoadedModel, ModelError, blocks_removed, find_blocks_path, load_model
from pruning.tasks import TaskError, load_task, parse_task_list

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "mistral", "opt", "qwen2"])
def test_block_removal_is_exact_and_reversible(family):
    lm = tiny_lm(family)
    loaded = LoadedModel(lm, None, family, "local", find_blocks_path(lm))
    ids = torch.randint(0, 128, (2, 9))
    before = lm(ids).logits
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    with blocks_removed(loaded, [1, 2]):
        assert loaded.num_blocks == 2
        pruned = lm(ids, use_cache=False).logits
    assert not torch.allclose(pruned, before)
    assert loaded.num_blocks == 4
    assert torch.equal(lm(ids).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in lm.state_dict().items())


def test_removed_model_generates_with_renumbered_cache():
    lm = tiny_lm()
    loaded = LoadedModel(lm, None, "llama", "local", find_blocks_path(lm))
    ids = torch.randint(0, 128, (1, 5))
    with blocks_removed(loaded, [0]):
        cached = lm.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = lm.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert lm.config.num_hidden_layers == 3
        assert [b.self_attn.layer_idx for b in loaded.blocks] == [0, 1, 2]
    assert torch.equal(cached, uncached)
    assert [b.self_attn.layer_idx for b in loaded.blocks] == [0, 1, 2, 3]


def test_bad_block_index_and_unknown_path():
    lm = tiny_lm()
    loaded = LoadedModel(lm, None, "llama", "local", find_blocks_path(lm))
    with pytest.raises(ModelError, match="block index 7 out of range; allowed: 0..3"):
        with blocks_removed(loaded, [7]):
            pass
    with pytest.raises(ModelError, match="blocks_path 'model.nothing'"):
        find_blocks_path(lm, "model.nothing")


def test_unknown_model_is_one_clear_line():
    with pytest.raises(ModelError, match="unknown model 'no-such-org/no-such-model'") as info:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(info.value)


def test_builtin_tasks_are_deterministic_and_split():
    a = load_task("pydoc_cloze", "validation", 20, seed=3)
    b = load_task("pydoc_cloze", "validation", 20, seed=3)
    assert a.examples == b.examples and len(a.examples) == 20
    train = {ex.requests[0][0] for ex in load_task("pydoc_cloze", "train").examples}
    validation = {ex.requests[0][0] for ex in load_task("pydoc_cloze", "validation").examples}
    assert not train & validation
    assert all(len(ex.requests) == 4 and 0 <= ex.gold < 4 for ex in a.examples)
    assert {ex.gold for ex in a.examples} != {a.examples[0].gold}
    assert load_task("pydoc_ppl", "validation", 5).kind == "perplexity"


def test_task_errors():
    with pytest.raises(TaskError, match="unknown split 'test'"):
        load_task("pydoc_ppl", "test")
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        load_task("nope")
    assert parse_task_list("zero_shot_7,piqa")[:2] == ["boolq", "piqa"]


def test_rolling_windows_cover_every_token_once():
    tokens = list(range(10, 33))
    windows = rolling_windows(tokens, 1, 8)
    predicted = [t for _, cont in windows for t in cont]
    assert predicted == tokens
    for ctx, cont in windows[1:]:
        assert len(ctx) + len(cont) == 9  # full context of max_length + 1


def test_encoding_moves_trailing_space_to_continuation(default_model):
    ctx, cont = encode_request(default_model.tokenizer, "Question: why?\nAnswer: ", "because")
    assert default_model.tokenizer.decode(ctx + cont) == "Question: why?\nAnswer: because"
    assert default_model.tokenizer.decode(cont).startswith(" ")


@pytest.fixture(scope="session")
def default_model():
    return load_model("default")


@pytest.mark.slow
def test_step_wide_scoring_gives_identical_scores(default_model):
    tasks = [load_task("pydoc_ppl", "validation", 1), load_task("pydoc_cloze", "validation", 6)]
    configs = [(), (3,), (17, 25), (29,)]
    together = Evaluator(default_model, tasks, 4).evaluate_many(configs)
    for removed in configs:
        alone = Evaluator(default_model, tasks, 4).evaluate(removed)
        assert {k: v.per_example for k, v in together[removed].scores.items()} == {k: v.per_example for k, v in alone.items()}


@pytest.mark.slow
def test_default_model_has_real_signal(default_model):
    tasks = [load_task("pydoc_ppl", "validation", 4), load_task("pydoc_cloze", "validation", 40)]
    configs = [(), (0,), (15,)]
    scored = Evaluator(default_model, tasks, 8).evaluate_many(configs)
    base, no_first, no_middle = (scored[c].scores for c in configs)
    assert base["pydoc_cloze"].metrics["acc"] >= 0.6  # chance is 0.25
    assert 10 < base["pydoc_ppl"].metrics["ppl"] < 30
    assert no_first["pydoc_ppl"].metrics["ppl"] > 100 * no_middle["pydoc_ppl"].metrics["ppl"]
    assert no_first["pydoc_cloze"].metrics["acc"] < no_middle["pydoc_cloze"].metrics["acc"] - 0.2


@pytest.mark.slow
@pytest.mark.service
def test_mlflow_run_sensitivity_end_to_end(tmp_path, sqlite_store):
    """`mlflow run . -e sensitivity --env-manager local` on a small sample, twice."""
    uri, client = sqlite_store
    first = mlflow_run(uri, "sensitivity", "n_samples=1", "tasks=pydoc_ppl", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    children = runs(client, "config")
    assert len(children) == 31 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["removed_blocks"] for r in children} == {""} | {str(i) for i in range(30)}
    (parent,) = runs(client, "sensitivity")
    history = client.get_metric_history(parent.info.run_id, "importance")
    importance = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(importance) == 30 and max(range(30), key=importance.__getitem__) == 0
    second = mlflow_run(uri, "sensitivity", "n_samples=1", "tasks=pydoc_ppl", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reused from the store: 31" in second.stdout
    assert len(runs(client, "config")) == 31


@pytest.mark.service
def test_unreachable_tracking_uri_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "search.sensitivity", "--tracking_uri", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"},
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: cannot reach tracking store 'http://127.0.0.1:9'")
    assert len(out.stderr.strip().splitlines()) == 1
