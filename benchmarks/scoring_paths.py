"""Benchmark part 5: the scoring paths (eager, compiled blocks, compiled blocks with flex_attention packed
rows), on the default model or, on CUDA, a random Llama-3-8B-shaped model."""

from __future__ import annotations

import statistics

import numpy as np
import torch

from benchmarks.common import LLAMA3_8B, _timed, flops_per_token, peak_flops, real_tasks
from pruning.compile import compile_blocks
from pruning.evaluate import Evaluator
from pruning.models import LoadedModel, find_blocks_path, load_model
from pruning.tasks import SUITES, Task, load_task

SCORING_PATHS = {"eager": (False, False), "compiled": (True, False), "compiled_flex": (True, True)}  # (compile, flex)


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """bf16 TFLOP/s of an n x n matrix product measured on `device` (the chip's practical ceiling)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b  # warm-up
    seconds = _timed(lambda: [a @ b for _ in range(repeats)])[1]
    return 2 * n**3 * repeats / seconds / 1e12


def _loglikelihoods(score) -> np.ndarray:
    """Every request's log-likelihood of a multiple-choice result, or every document's NLL of a perplexity one."""
    if "loglikelihoods" in score.per_example:
        return np.concatenate(score.per_example["loglikelihoods"])
    return np.asarray(score.per_example["nll"])


def bench_scoring(loaded: LoadedModel, tasks: list[Task], batch_size: int, repeats: int = 1) -> dict:
    """The same tasks scored eagerly, with compiled blocks, and with compiled blocks and flex_attention
    packed rows: the first pass (compiling) and the median of `repeats` later passes, tokens/s (padding
    excluded), and per-example agreement with the eager path."""
    from torch._dynamo.utils import counters

    out, reference = {}, None
    for path, (compile, flex) in SCORING_PATHS.items():
        graphs = counters["stats"]["unique_graphs"]
        evaluator = Evaluator(loaded, tasks, batch_size, compile=compile, flex=flex)
        scores, first = _timed(lambda e=evaluator: e.evaluate(()))
        seconds = statistics.median(_timed(lambda e=evaluator: e.evaluate(()))[1] for _ in range(repeats))
        tokens = sum(c.prepared.n_tokens for c in evaluator.chunks)
        reference = reference or scores
        lls = [np.abs(_loglikelihoods(s) - _loglikelihoods(r)) for s, r in zip(scores.values(), reference.values())]
        out[path] = {
            "seconds": seconds,
            "first_pass_seconds": first,
            "compile_seconds": first - seconds,
            "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
            "flex": evaluator.flex,
            "batches": sum(len(c.prepared.batches) for c in evaluator.chunks),
            "tokens_per_pass": tokens,
            "tokens_per_s": tokens / seconds,
            "acc_equal": all(
                s.per_example.get(m) == r.per_example.get(m)
                for s, r in zip(scores.values(), reference.values())
                for m in ("acc", "acc_norm")
            ),
            "max_abs_ll_diff": float(max(d.max() for d in lls)),
        }
    compile_blocks(loaded.blocks, False)
    return {
        "tasks": {t.name: {"n": len(t.examples)} for t in tasks},
        "batch_size": batch_size,
        "repeats": repeats,
        "paths": out,
        "compiled_speedup": out["eager"]["seconds"] / out["compiled"]["seconds"],
        "flex_speedup": out["compiled"]["seconds"] / out["compiled_flex"]["seconds"],
        "total_speedup": out["eager"]["seconds"] / out["compiled_flex"]["seconds"],
        "acc_equal": all(p["acc_equal"] for p in out.values()),
    }


def bench_gpu_scoring(device: torch.device, n: int, data: str | None, batch_size: int, peak_tflops: float | None) -> dict:
    """`bench_scoring` at Llama-3-8B shape (random weights, bf16) on the seven zero-shot tasks (n examples
    each, seeded; the builtin tasks when the real ones are absent), with MFU of each path against the
    datasheet peak and against a measured bf16 matrix product. Block FLOPs per token as `flops_per_token`,
    attention at the mean tokens per example."""
    from transformers import AutoConfig, AutoModelForCausalLM

    names, real = real_tasks(SUITES["zero_shot_7"], data)
    tokenizer = load_model("default", device="cpu").tokenizer  # ids fit Llama-3's vocabulary
    config = AutoConfig.for_model("llama", **LLAMA3_8B)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    loaded = LoadedModel(model, tokenizer, "random-llama3-8b-shape", "random", find_blocks_path(model))
    tasks = [load_task(name, "validation", n, seed=0, data_dir=real) for name in names]
    out = bench_scoring(loaded, tasks, batch_size)
    examples = sum(len(t.examples) for t in tasks)
    per_token = flops_per_token(model, round(out["paths"]["eager"]["tokens_per_pass"] / examples))
    peak, ceiling = peak_flops(device, peak_tflops), matmul_tflops(device) * 1e12
    for path in out["paths"].values():
        path["tflops"] = path["tokens_per_s"] * per_token / 1e12
        path["mfu"] = path["tflops"] * 1e12 / peak if peak else None
        path["matmul_fraction"] = path["tflops"] * 1e12 / ceiling
    return {
        **out,
        "shape": {"family": "llama", **LLAMA3_8B},
        "dtype": "bfloat16",
        "data": real or "builtin",
        "gflop_per_token": per_token / 1e9,
        "peak_tflops": peak / 1e12 if peak else None,
        "matmul_tflops": ceiling / 1e12,
    }
