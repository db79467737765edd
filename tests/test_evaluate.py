"""Shared-context scoring and the benchmarks: same log-likelihoods and accuracies as separate rows."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_lm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package

from benchmarks.forward import bench_forward, word_tokenizer  # noqa: E402
from benchmarks.report import markdown, summary  # noqa: E402
from benchmarks.sensitivity import bench_sensitivity  # noqa: E402
from pruning.evaluate import Evaluator, look_sizes  # noqa: E402
from pruning.models import LoadedModel, find_blocks_path, load_model  # noqa: E402
from pruning.packing import SHARED_CONTEXT_FAMILIES, packed_attention_mask, shares_context  # noqa: E402
from pruning.tasks import Document, MultipleChoice, Task, load_task  # noqa: E402
from pruning.units import Unit, UnitError  # noqa: E402

VOCAB = 128


def tiny(family: str, layers: int = 4) -> LoadedModel:
    """A tiny random model of `family` with a word tokenizer of VOCAB words."""
    lm = tiny_lm(family, layers, VOCAB)
    return LoadedModel(lm, word_tokenizer(VOCAB), family, "local", find_blocks_path(lm))


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(1, VOCAB)}" for _ in range(n))


def mc_task(n: int = 12, seed: int = 0) -> Task:
    """Examples of every shape: shared contexts, per-choice contexts with one continuation
    (winogrande), an empty context, a repeated choice, trailing context spaces."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        context = words(rng, rng.randrange(3, 14))
        choices = [" " + words(rng, rng.randrange(1, 6)) for _ in range(rng.randrange(2, 5))]
        if i % 4 == 1:
            requests = [(f"{context} {c.strip()}", " w7 w9") for c in choices]
        elif i % 4 == 2:
            choices[-1] = choices[0]
            requests = [(context + " ", c.strip()) for c in choices]
        else:
            requests = [("" if i % 4 == 3 else context, c) for c in choices]
        examples.append(MultipleChoice(i, tuple(requests), rng.randrange(len(choices)), tuple(float(len(c)) for c in choices)))
    return Task("synthetic_mc", "validation", "multiple_choice", examples, source="generated")


def lls(scores) -> np.ndarray:
    return np.concatenate(
        [np.concatenate(s.per_example["loglikelihoods"]) for s in scores.values() if s.kind == "multiple_choice"]
    )


def assert_same_scores(a, b, tol: float) -> None:
    """Same log-likelihoods within `tol` and the same accuracies (multiple-choice tasks)."""
    assert np.abs(lls(a) - lls(b)).max() < tol
    for name in (n for n in a if a[n].kind == "multiple_choice"):
        assert a[name].per_example["acc"] == b[name].per_example["acc"]
        assert a[name].per_example["acc_norm"] == b[name].per_example["acc_norm"]


def test_packed_mask_sees_own_prefix_and_request():
    # example A: prefix (segment 0), two choices (1, 2); example B: prefix 3, one choice 4; padding
    segments = torch.tensor([[0, 0, 1, 1, 2, 3, 4, -1]])
    prefixes = torch.tensor([[0, 0, 0, 0, 0, 3, 3, -1]])
    allowed = packed_attention_mask(segments, prefixes, torch.float32)[0, 0] == 0
    assert allowed.int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # padding sees itself: no empty row
    ]


@pytest.mark.parametrize("family", SHARED_CONTEXT_FAMILIES)
def test_shared_context_scores_like_separate_rows(family):
    loaded = tiny(family)
    task = mc_task()
    shared = Evaluator(loaded, [task], 4, max_length=64)
    separate = Evaluator(loaded, [task], 4, max_length=64, shared_context=False)
    (chunk,) = shared.chunks
    packed = chunk.prepared
    assert packed.shared_context and not separate.chunks[0].prepared.shared_context
    assert packed.n_tokens < separate.chunks[0].prepared.n_tokens
    assert len(packed.batches) == 1 and packed.batches[0].input_ids.shape[0] < len(task.examples)  # rows hold examples
    assert_same_scores(shared.evaluate(()), separate.evaluate(()), 1e-4)


def test_repeated_choices_tie_exactly():
    scores = Evaluator(tiny("llama"), [mc_task()], 4, max_length=64).evaluate(())["synthetic_mc"]
    repeated = scores.per_example["loglikelihoods"][2]
    assert repeated[0] == repeated[-1]


def test_sliding_window_longer_than_rows_is_needed():
    mistral = tiny("mistral").model  # sliding window 4096, context 131072
    assert not shares_context(mistral, 8192)
    assert shares_context(mistral, 4096)
    mistral.config._attn_implementation = "flash_attention_2"  # takes no 4D mask
    assert not shares_context(mistral, 64)


def ppl_task(n: int = 30, seed: int = 0) -> Task:
    rng = random.Random(seed)
    return Task(
        "synthetic_ppl",
        "validation",
        "perplexity",
        [Document(i, words(rng, rng.randrange(5, 90))) for i in range(n)],
        source="generated",
    )


@pytest.mark.parametrize(
    "family,shared", [("llama", True), ("qwen2", True), ("mistral", False), ("gpt_neox", True), ("opt", False), ("gemma2", False)]
)
def test_step_wide_scores_equal_each_configuration_alone(family, shared):
    loaded = tiny(family, layers=6)
    tasks = [mc_task(70, seed=1), ppl_task()]
    budget = 2e-5  # GiB: chunks of one or two examples
    many = Evaluator(loaded, tasks, 3, max_length=32, chunk_budget_gb=budget, shared_context=shared)
    assert many.shared_context == shared and len(many.chunks) > 2 * many.n_looks
    sublayers = [("a0",), ("m2",), (Unit(1, "a"), Unit(1, "m")), ("a2", "b4"), ("m3", "a5"), ("a4",)]
    configs = [(), (0,), (2,), (1, 4), (3, 5), (5,), *sublayers]
    together = many.evaluate_many(configs)
    assert len({id(v) for v in together.values()}) == len(configs)
    whole = Evaluator(loaded, tasks, 3, max_length=32, chunk_budget_gb=64, shared_context=shared)
    assert len(whole.chunks) == sum(len(look_sizes(len(t.examples))) for t in tasks)  # cut at the looks only
    for removed in configs:
        alone = Evaluator(loaded, tasks, 3, max_length=32, chunk_budget_gb=budget, shared_context=shared).evaluate(removed)
        assert {k: v.per_example for k, v in together[removed].scores.items()} == {k: v.per_example for k, v in alone.items()}
        unchunked = whole.evaluate(removed)
        assert_same_scores(together[removed].scores, unchunked, 1e-4)  # other batches: float noise
        nll = [np.array(s["synthetic_ppl"].per_example["nll"]) for s in (alone, unchunked)]
        assert np.abs(nll[0] - nll[1]).max() < 1e-3


def test_bad_unit_configurations_are_rejected_before_scoring():
    ev = Evaluator(tiny("llama", layers=2), [mc_task(4)], 4, max_length=64)
    for bad, message in (("x1",), "cannot parse"), (("m2",), "out of range"), (("a0", "m0", "b1"), "every block"):
        with pytest.raises(UnitError, match=message):
            ev.evaluate_many([(0,), bad])


def test_kept_states_are_bounded_by_one_chunk():
    loaded = tiny("llama", layers=6)
    task = mc_task(120, seed=3)
    whole = Evaluator(loaded, [task], 4, max_length=64, chunk_budget_gb=64)
    budget = whole.max_state_bytes / 5 / 2**30
    chunked = Evaluator(loaded, [task], 4, max_length=64, chunk_budget_gb=budget)
    assert len(chunked.chunks) > len(whole.chunks) and chunked.max_state_bytes <= chunked.chunk_budget
    sizes, seen = look_sizes(120), [len(c.examples) for c in chunked.chunks]
    assert sizes == [32, 64, 120] and sum(seen) == 120
    kept = []
    plain = Evaluator._record

    def record(self, chunk, blocks, baseline, progress):
        states, as_tuple = plain(self, chunk, blocks, baseline, progress)
        kept.append(sum(s.numel() * s.element_size() for s in states.values()))
        return states, as_tuple

    Evaluator._record = record
    try:
        chunked.evaluate_many([(i,) for i in range(6)])
    finally:
        Evaluator._record = plain
    assert len(kept) == len(chunked.chunks) and max(kept) <= chunked.chunk_budget


def test_a_failing_configuration_does_not_stop_the_others(monkeypatch):
    ev = Evaluator(tiny("llama"), [mc_task(10)], 4, max_length=64)
    plain = Evaluator._score_config

    def broken(self, chunk, removed, *args):
        if removed == (Unit(2),):  # configurations reach the scorer normalized (pruning.units)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return plain(self, chunk, removed, *args)

    monkeypatch.setattr(Evaluator, "_score_config", broken)
    out = ev.evaluate_many([(1,), (2,), (3,)])
    assert out[(2,)].scores is None and "illegal memory access" in str(out[(2,)].error)
    assert out[(1,)].error is None and out[(3,)].scores["synthetic_mc"].n == 10


def test_sensitivity_benchmark_on_a_tiny_model():
    loaded, tasks = tiny("llama"), [mc_task(40)]
    out = bench_sensitivity(loaded, tasks, 4, budget_share=1 / 30)
    assert out["configs"] == 5 and out["max_abs_diff"] == 0.0
    assert out["chunk_budget_mb"] == pytest.approx(out["dataset_states_mb"] / 30)
    # a chunk holds at least one example, which may exceed the budget: bounded by a few examples' states
    assert out["chunks"] > 10 and out["kept_states_mb"] < out["dataset_states_mb"] / 10
    assert out["speedup"] == out["seconds_from_scratch"] / out["seconds_stepwide"]
    whole = Evaluator(loaded, tasks, 4, chunk_budget_gb=64)  # the same examples in one chunk: contexts shared alike
    assert out["tokens_per_pass"] == sum(c.prepared.n_tokens for c in whole.chunks)


def test_sublayer_sensitivity_benchmark_on_a_tiny_model():
    loaded, tasks = tiny("llama"), [mc_task(40)]
    out = bench_sensitivity(loaded, tasks, 4, removal_unit="sublayer")
    assert out["configs"] == 1 + 2 * 4 and out["max_abs_diff"] == 0.0 and out["removal_unit"] == "sublayer"
    assert out["speedup"] == out["seconds_from_scratch"] / out["seconds_stepwide"]


def test_forward_benchmark_on_a_tiny_model():
    shape = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    forward = bench_forward(
        torch.device("cpu"), shape, batch_size=2, seq_len=16, n_batches=2, repeats=2, peak_tflops=1.0, dtype=torch.float32
    )
    assert forward["tokens_per_pass"] == 64 and forward["kept_on"] == "cpu" and forward["peak_memory_mb"] is None
    params = 2 * (2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32) + 32 + 32 * VOCAB)
    assert forward["gflop_per_token"] * 1e9 == params + 2 * 2 * 32 * 16
    for key in ("plain", "ours"):
        assert forward[key]["mfu"] == pytest.approx(forward[key]["tokens_per_s"] * forward["gflop_per_token"] * 1e9 / 1e12)
    results = {"device": "cpu", "forward": {**forward, "device": "cpu", "date": "today"}}
    assert summary(results)["mfu"] == forward["ours"]["mfu"]
    assert "| forward, random 2 x 32 Llama, float32 (ours: scoring) |" in markdown(results)


@pytest.mark.slow
def test_shared_context_on_the_default_model():
    loaded = load_model("default")
    tasks = [load_task("pydoc_cloze", "validation", 12, seed=1)]
    shared = Evaluator(loaded, tasks, 8).evaluate(())
    separate = Evaluator(loaded, tasks, 8, shared_context=False).evaluate(())
    assert_same_scores(shared, separate, 1e-4)
