"""Compiled blocks and flex_attention packed rows score like the eager, dense-mask path, example by example."""

import logging

import numpy as np
import pytest
import torch
from test_evaluate import assert_same_scores, lls, mc_task, tiny
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_mask

from pruning.compile import bucketed, flex_reason, is_compiled, packed_block_mask, use_compile
from pruning.evaluate import Evaluator
from pruning.packing import ROW_TOKENS, packed_attention_mask

CONFIGS = [(), (0,), (2,), (1, 3)]  # the baseline, removals from the first block and after it (replayed states)
# compiling is slow on a CPU: the compiled tests meet one shape bucket each
BF16_TOL = 0.1  # largest log-likelihood difference, compiled vs eager in bfloat16 (nats, summed over a continuation)


def test_compile_setting():
    assert use_compile("auto", torch.device("cuda")) and not use_compile("auto", torch.device("cpu"))
    assert use_compile("true", torch.device("cpu")) and not use_compile("false", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown compile 'yes'; allowed: auto, true, false"):
        use_compile("yes", torch.device("cpu"))


def test_block_mask_is_the_packed_mask():
    rng = np.random.default_rng(0)
    segments = torch.tensor(np.sort(rng.integers(0, 9, (2, 300)), axis=1))
    prefixes = segments - segments % 3  # examples of a prefix and two requests
    segments[:, -20:], prefixes[:, -20:] = -1, -1  # padding
    dense = packed_attention_mask(segments, prefixes, torch.float32)[:, 0] == 0
    sparse = packed_block_mask(segments, prefixes)
    assert torch.equal(create_mask(sparse.mask_mod, 2, None, 300, 300)[:, 0], dense)
    assert sparse.sparsity() > 0  # tiles with nothing to see are skipped


@pytest.mark.slow
def test_compiled_flex_scoring_equals_eager_dense(caplog):
    loaded, tasks = tiny("llama"), [mc_task(32, seed=1)]  # one chunk, one packed row
    eager = Evaluator(loaded, tasks, 3, max_length=32)
    assert not eager.flex and not any(is_compiled(b) for b in loaded.blocks)
    reference = eager.evaluate_many(CONFIGS)
    graphs = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.INFO, logger="pruning.evaluate"):
        compiled = Evaluator(loaded, tasks, 3, max_length=32, compile=True)
    assert "blocks compiled, packed rows with flex_attention block masks" in caplog.text
    assert compiled.flex and all(is_compiled(b) for b in loaded.blocks)
    shapes = [(c.prepared.flex, tuple(b.input_ids.shape)) for c in compiled.chunks for b in c.prepared.batches]
    assert all(bucketed(*shape) == shape for _, shape in shapes)
    assert all(c.prepared.flex for c in compiled.chunks)
    assert max(width for _, (_, width) in shapes) > ROW_TOKENS  # packed rows hold more than the dense path's
    together = compiled.evaluate_many(CONFIGS)  # step-wide: states kept by hooks on compiled blocks, replayed
    # one compilation per shape bucket and attention path for the whole study, not one per pass
    assert counters["stats"]["unique_graphs"] - graphs == len(set(shapes))
    for removed in CONFIGS:
        assert_same_scores(together[removed].scores, reference[removed].scores, 1e-4)
    Evaluator(loaded, tasks, 3, max_length=32)  # an eager evaluator makes the blocks eager again
    assert not any(is_compiled(b) for b in loaded.blocks)


@pytest.mark.slow
def test_compiled_bfloat16_within_tolerance():
    loaded, tasks = tiny("qwen2"), [mc_task(24, seed=2)]
    loaded.model.to(torch.bfloat16)
    eager = Evaluator(loaded, tasks, 4, max_length=64).evaluate(())
    compiled = Evaluator(loaded, tasks, 4, max_length=64, compile=True, flex=False).evaluate(())
    assert_same_scores(compiled, eager, BF16_TOL)
    assert np.abs(lls(compiled) - lls(eager)).max() > 0  # bf16 rounding differs: the tolerance is needed


def test_dense_fallback_where_flex_is_missing(caplog):
    loaded = tiny("gpt2")
    assert flex_reason(loaded.model) == "GPT2LMHeadModel does not support flex_attention"
    with caplog.at_level(logging.INFO, logger="pruning.evaluate"):
        evaluator = Evaluator(loaded, [mc_task(8)], 4, max_length=64, compile=True)
    assert not evaluator.flex and evaluator.shared_context
    assert "packed rows with dense 4D masks (GPT2LMHeadModel does not support flex_attention)" in caplog.text
    assert max(b.input_ids.shape[1] for c in evaluator.chunks for b in c.prepared.batches) <= ROW_TOKENS


def test_gpu_scoring_keys_and_table():
    from benchmarks.report import markdown, summary

    def path(rate, mfu):
        return {"tokens_per_s": rate, "mfu": mfu, "matmul_fraction": mfu * 1.25, "compile_seconds": 30.0, "max_abs_ll_diff": 0.01}

    paths = {"eager": path(100.0, 0.4), "compiled": path(150.0, 0.6), "compiled_flex": path(180.0, 0.72)}
    part = {"paths": paths, "compiled_speedup": 1.5, "flex_speedup": 1.2, "total_speedup": 1.8, "acc_equal": True}
    part |= {"tasks": {"piqa": {"n": 200}}, "device": "NVIDIA H200", "date": "2026-12-04"}
    flat = summary({"gpu_scoring": part})
    assert flat["gpu_scoring_tokens_per_s"] == 180.0 and flat["gpu_scoring_mfu"] == 0.72
    assert (flat["gpu_compiled_speedup"], flat["gpu_flex_speedup"]) == (1.5, 1.2)
    assert (flat["gpu_scoring_device"], flat["gpu_scoring_date"]) == ("NVIDIA H200", "2026-12-04")
    assert "| 1.80x (compiled 1.50x, flex 1.20x; acc identical: yes" in markdown({"gpu_scoring": part})
    assert "180 tok/s, MFU 72.0% (90% of matmul), compiling 30 s" in markdown({"gpu_scoring": part})
