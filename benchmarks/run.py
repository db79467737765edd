"""Speed of the scorer, as ratios measured within one run on the same model and data.

    python -m benchmarks.run [--quick true] [--device auto] [--gpu_only true]

1. sensitivity: the baseline and every single-block removal of the default model, step-wide
   (all configurations together, chunk by chunk) against each configuration alone, on the same
   chunks; speedup and the largest difference of any metric or per-example value. Once with a
   budget for all the data's block states, once at user-scale proportions (`scale_sensitivity`:
   a budget holding 1/30 of them, as 4 GB does for Llama-3-8B on the seven tasks, on piqa,
   arc_easy and hellaswag from ../shared/data). `sublayer`: the same with every attention and
   MLP sublayer removed alone (`--parts sublayer`), 2L + 1 configurations.
4. racing: the same beam search with and without racing, each in a fresh store: example-
   configurations scored, wall time, and whether the recommendations are identical.
2. multiple choice: our scorer against lm-eval-harness's own HF model class (`HFLM`) scoring
   the requests lm-eval's task builds, on the same documents; speedup, and whether acc and
   acc_norm (per document, by lm-eval's `process_results`) are identical. Both in float32,
   batch size 8 (lm-eval: 8 requests; ours: 8 rows, a row holding the choices of several
   examples, about 256 tokens).
3. on CUDA only: tokens/s and model FLOPs utilisation of the forward pass of a random-weight
   model of Llama-3-8B's shape in bf16 (built from its config, nothing downloaded): plain
   transformers (`model(input_ids)`, logits only), our scorer (float32 log-likelihood of every
   position) and our scorer while keeping activations for reuse.
5. scoring paths: eager against compiled blocks against compiled blocks with flex_attention
   packed rows (`pruning.compile`), the same tasks scored by each: tokens/s, compile time,
   speedups, and whether acc/acc_norm are identical per example (largest log-likelihood
   difference). On the CPU or the named device with the default model (`scoring`); on CUDA
   (`gpu_scoring`, also with `--gpu_only`) with a random-weight Llama-3-8B-shaped model in bf16
   on the seven zero-shot tasks (a seeded subset), with MFU against the datasheet peak and
   against a bf16 matrix product measured on the same chip.

Parts 1, 4, 2 and 5 (scoring) run on the CPU or the named device; 3 and 5 (gpu_scoring) on CUDA only.
Writes benchmarks/results/latest.json and latest.md. A part that did not run keeps its
previous numbers there, each part with its own machine and date.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from contract import cli, names
from contract.cli import setting
from pruning.compile import compile_blocks
from pruning.evaluate import Evaluator, look_sizes
from pruning.models import LoadedModel, find_blocks_path, load_model
from pruning.tasks import SUITES, Document, Task, builtin, load_task
from pruning.tasks.harness import DATA_DIR_ENV, build_lm_eval_task
from pruning.units import all_units

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"
MC_TASKS = ("piqa", "arc_easy")
LLAMA3_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
# dense bf16 datasheet peaks, TFLOP/s; the first name contained in the device name wins
PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}
SCALE_TASKS = ("piqa", "arc_easy", "hellaswag")  # part 1 at user-scale proportions: real tasks, else builtin ones
PARTS = ("sensitivity", "scale", "sublayer", "racing", "mc", "scoring", "forward", "gpu_scoring")
GPU_PARTS = ("forward", "gpu_scoring")
SIZES = {  # examples per task; racing: beam width and most blocks removed; GPU batches of 8 x 1024 tokens
    True: {
        "sensitivity_n": 2,
        "scale_n": 3,
        "racing_tasks": ("openbookqa",),  # the shortest real task (CPU time)
        "racing_n": 64,
        "racing_width": 3,
        "racing_removed": 1,
        "mc_n": 8,
        "gpu_batches": 4,
        "mc_repeats": 1,
        "scoring_n": 8,
        "gpu_scoring_n": 20,
    },
    False: {
        "sensitivity_n": 50,
        "scale_n": 100,
        "racing_tasks": SCALE_TASKS,  # tasks the default model scores well above chance on
        "racing_n": 200,
        "racing_width": 3,
        "racing_removed": 3,
        "mc_n": 200,
        "gpu_batches": 8,
        "mc_repeats": 2,
        "scoring_n": 100,
        "gpu_scoring_n": 200,  # of the 1,000 per task of a user-scale step: a seeded subset that fits 10 minutes
    },
}
SCALE_BUDGET_SHARE = 1 / 30  # 4 GB of kept states against ~110 GB for Llama-3-8B on the seven tasks


def machine(device: torch.device) -> str:
    """The accelerator's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"CPU: {name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _stamp(device: torch.device) -> dict:
    return {"device": machine(device), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def write_layouts(folder: Path, n: int) -> None:
    """piqa and arc_easy JSONL in the Hugging Face layouts, made from the builtin cloze items
    (used when the real subsets are absent)."""
    items = builtin.cloze_items("train")[:n]
    for name in MC_TASKS:
        (folder / name).mkdir(parents=True, exist_ok=True)
    with open(folder / "piqa" / "validation.jsonl", "w") as f:
        for ex in items:
            (ctx, a), (_, b) = ex.requests[ex.gold], ex.requests[(ex.gold + 1) % 4]
            sols = (a, b) if ex.doc_id % 2 == 0 else (b, a)
            f.write(json.dumps({"goal": ctx, "sol1": sols[0].strip(), "sol2": sols[1].strip(), "label": ex.doc_id % 2}) + "\n")
    with open(folder / "arc_easy" / "validation.jsonl", "w") as f:
        for ex in items:
            f.write(
                json.dumps(
                    {
                        "id": str(ex.doc_id),
                        "question": ex.requests[0][0][-120:],
                        "choices": {"text": [c.strip() for _, c in ex.requests], "label": list("ABCD")},
                        "answerKey": "ABCD"[ex.gold],
                    }
                )
                + "\n"
            )


def data_dir(requested: str | None, n: int, scratch: Path) -> tuple[str, str]:
    """(folder with piqa and arc_easy JSONL, where it came from)."""
    for folder in filter(None, (requested, os.environ.get(DATA_DIR_ENV), str(SHARED_DATA))):
        if all((Path(folder) / t / "validation.jsonl").is_file() for t in MC_TASKS):
            return folder, f"real subsets from {folder}"
    write_layouts(scratch, n)
    return str(scratch), "generated from the builtin pydoc cloze items (real subsets absent)"


def real_tasks(wanted: tuple[str, ...], requested: str | None) -> tuple[tuple[str, ...], str | None]:
    """(tasks, data folder): `wanted` from real subsets when present, else the builtin tasks."""
    for folder in filter(None, (requested, os.environ.get(DATA_DIR_ENV), str(SHARED_DATA))):
        if all((Path(folder) / t / "validation.jsonl").is_file() for t in wanted):
            return wanted, folder
    return ("pydoc_cloze", "pydoc_ppl"), None


def _numbers(scores) -> np.ndarray:
    """Every metric and per-example value of a result, flattened, in a fixed order."""
    values = []
    for name in sorted(scores):
        s = scores[name]
        values += [s.metrics[m] for m in sorted(s.metrics)]
        for key in sorted(s.per_example):
            for v in s.per_example[key]:
                values += v if isinstance(v, list) else [v]
    return np.asarray(values, dtype=np.float64)


def _warm_up(loaded: LoadedModel, task: Task, batch_size: int) -> None:
    """Score two examples, so that one-time initialisation lands in no timing."""
    Evaluator(loaded, [dataclasses.replace(task, examples=task.examples[:2])], batch_size).evaluate(())


def bench_sensitivity(
    loaded: LoadedModel, tasks: list[Task], batch_size: int, budget_share: float | None = None, removal_unit: str = "block"
) -> dict:
    """A sensitivity study (baseline + every single-unit removal: blocks, or with `removal_unit`
    `sublayer` every attention and MLP sublayer): step-wide, all configurations together, against
    each configuration alone (from scratch), on the same chunks, so the per-example results must
    be identical. `budget_share`: the chunk budget holds that share of the dataset's block states
    (user-scale proportions), else all of them."""
    configs = [()] + [(u,) for u in all_units(loaded.num_blocks, removal_unit)]
    _warm_up(loaded, tasks[0], batch_size)
    ample = Evaluator(loaded, tasks, batch_size, chunk_budget_gb=2**20)
    dataset_states = sum(c.state_bytes for c in ample.chunks) * ample.kept_blocks
    budget = dataset_states * budget_share if budget_share else dataset_states
    evaluator = Evaluator(loaded, tasks, batch_size, chunk_budget_gb=budget / 2**30)
    alone, scratch = _timed(lambda: {c: evaluator.evaluate(c) for c in configs})
    together, stepwide = _timed(lambda: evaluator.evaluate_many(configs))
    diff = max(float(np.abs(_numbers(alone[c]) - _numbers(together[c].scores)).max()) for c in configs)
    return {
        "configs": len(configs),
        "removal_unit": removal_unit,
        "tasks": {t.name: {"n": len(t.examples)} for t in tasks},
        "tokens_per_pass": sum(c.prepared.n_tokens for c in evaluator.chunks),
        "dataset_states_mb": dataset_states / 2**20,
        "chunk_budget_mb": budget / 2**20,
        "kept_states_mb": evaluator.max_state_bytes / 2**20,
        "chunks": len(evaluator.chunks),
        "seconds_stepwide": stepwide,
        "seconds_from_scratch": scratch,
        "speedup": scratch / stepwide,
        "max_abs_diff": diff,
    }


def racing_ceiling(exhaustive: int, candidates_per_step: list[int], width: int, full: int, first: int) -> float:
    """The most any racing rule could save: `exhaustive` example-configurations against the same with
    every candidate outside the beam stopped at the first look (`first` of `full` examples, over the tasks)."""
    saved = sum((m - min(width, m)) * (full - first) for m in candidates_per_step)
    return exhaustive / (exhaustive - saved)


def bench_racing(model: str, tasks: list[str], n: int, folder: str, width: int, max_removed: int, batch_size: int) -> dict:
    """The same beam search (the mean beam) with and without racing, each in a fresh store:
    example-configurations scored, wall time, and whether the recommendations are identical."""
    from mlflow.tracking import MlflowClient

    from contract.tracking import load_json
    from search import beam
    from search.cli import run_main

    out = {}
    with tempfile.TemporaryDirectory() as scratch:
        for racing in ("true", "false"):
            uri = f"sqlite:///{scratch}/racing-{racing}.db"
            argv = [
                "--model",
                model,
                "--tasks",
                ",".join(tasks),
                "--n_samples",
                str(n),
                "--data_dir",
                folder,
                "--batch_size",
                str(batch_size),
                "--dtype",
                "float32",
                "--beam_width",
                str(width),
                "--max_removed",
                str(max_removed),
                "--criterion",
                "mean",
                "--racing",
                racing,
                "--tracking_uri",
                uri,
            ]
            code, seconds = _timed(lambda argv=argv: run_main(beam.main, argv))
            assert code == 0, f"beam search with racing={racing} failed"
            client = MlflowClient(uri)
            experiments = [e.experiment_id for e in client.search_experiments()]
            (run,) = client.search_runs(experiments, "tags.`prunetrack.kind` = 'beam_search'")
            results = load_json(client, run.info.run_id, names.BEAM_RESULTS)
            out[racing] = {
                "seconds": seconds,
                "example_configs": results["worker"]["examples_scored"],
                "stopped": results["worker"]["stopped"],
                "evaluated": results["worker"]["evaluated"],
                "picks": [e["removed_blocks"] for e in results["recommendations"]],
                "candidates_per_step": [
                    len(load_json(client, run.info.run_id, names.beam_step(k))["candidates"])
                    for k in range(1, len(results["recommendations"]) + 1)
                ],
            }
    on, off = out["true"], out["false"]
    ceiling = racing_ceiling(
        off["example_configs"], off["candidates_per_step"], width, n * len(tasks), look_sizes(n)[0] * len(tasks)
    )
    return {
        "tasks": {t: {"n": n} for t in tasks},
        "beam_width": width,
        "max_removed": max_removed,
        "racing": on,
        "exhaustive": off,
        "eval_ratio": off["example_configs"] / on["example_configs"],
        "eval_ratio_ceiling": ceiling,
        "speedup": off["seconds"] / on["seconds"],
        "same_recommendations": on["picks"] == off["picks"],
    }


def bench_mc(loaded: LoadedModel, n: int, folder: str, batch_size: int, repeats: int) -> dict:
    """Our scorer against lm-eval's HF model class on the same requests, back to back.

    lm-eval's side is `HFLM.loglikelihood` on the requests its task builds (tokenizing, batching,
    scoring) with acc/acc_norm from the task's own `process_results`; ours is `Evaluator`
    (tokenizing, packing, scoring, metrics). Task loading is outside both timings.
    """
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    per_task, turn = {}, 0
    for name in MC_TASKS:
        task = load_task(name, "validation", n, seed=0, data_dir=folder)
        lm_task, docs = build_lm_eval_task(name, "validation", folder)
        requests = [
            Instance("loglikelihood", docs[ex.doc_id], req, j, (name, ex.doc_id, 1))
            for ex in task.examples
            for j, req in enumerate(ex.requests)
        ]
        if not per_task:
            _warm_up(loaded, task, batch_size)
            lm.loglikelihood(requests[:4], disable_tqdm=True)
        runs = {
            "ours": lambda task=task, name=name: Evaluator(loaded, [task], batch_size).evaluate(())[name],
            "lm_eval": lambda requests=requests: lm.loglikelihood(requests, disable_tqdm=True),
        }
        seconds, result = {"ours": 0.0, "lm_eval": 0.0}, {}
        for _ in range(repeats):
            for key in ("ours", "lm_eval") if turn % 2 == 0 else ("lm_eval", "ours"):
                result[key], spent = _timed(runs[key])
                seconds[key] += spent
            turn += 1
        ours, theirs, start = result["ours"], [], 0
        for ex in task.examples:
            theirs.append(lm_task.process_results(docs[ex.doc_id], result["lm_eval"][start : start + len(ex.requests)]))
            start += len(ex.requests)
        metrics = {m: [int(doc[m]) for doc in theirs] for m in ("acc", "acc_norm")}
        per_task[name] = {
            "n": len(task.examples),
            "requests": len(requests),
            "seconds_ours": seconds["ours"],
            "seconds_lm_eval": seconds["lm_eval"],
            "acc": ours.metrics["acc"],
            "acc_norm": ours.metrics["acc_norm"],
            "acc_lm_eval": float(np.mean(metrics["acc"])),
            "acc_norm_lm_eval": float(np.mean(metrics["acc_norm"])),
            "identical": all(metrics[m] == ours.per_example[m] for m in metrics),
        }
    total_ours = sum(t["seconds_ours"] for t in per_task.values())
    total_theirs = sum(t["seconds_lm_eval"] for t in per_task.values())
    return {
        "tasks": per_task,
        "repeats": repeats,
        "seconds_ours": total_ours,
        "seconds_lm_eval": total_theirs,
        "speedup": total_theirs / total_ours,
        "acc_equal": all(t["identical"] for t in per_task.values()),
    }


def word_tokenizer(vocab_size: int):
    """A tokenizer whose words `w1` ... `w<vocab_size-1>` are token ids 1 ...; `<s>` (0) is BOS/EOS/pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<s>", pad_token="<s>", unk_token="<s>")


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """2 x the parameters (all but the input embedding lookup, unless it is tied to the output layer)
    plus causal attention, 2 x layers x attention width x seq_len (QK^T and AV at mean context seq_len / 2)."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * params + 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    name = machine(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def bench_forward(
    device: torch.device,
    shape: dict = LLAMA3_8B,
    batch_size: int = 8,
    seq_len: int = 1024,
    n_batches: int = 8,
    repeats: int = 3,
    peak_tflops: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Forward throughput and MFU, plain transformers and our scorer; the baseline and the middle
    block's removal step-wide against each alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    loaded = LoadedModel(model, word_tokenizer(config.vocab_size), "random-llama", "random", find_blocks_path(model))
    words = torch.randint(1, config.vocab_size, (batch_size * n_batches, seq_len), generator=torch.Generator().manual_seed(0))
    task = Task(
        "random_tokens",
        "validation",
        "perplexity",
        [Document(i, " ".join(f"w{t}" for t in row)) for i, row in enumerate(words.tolist())],
        source="generated",
    )
    ours = Evaluator(loaded, [task], batch_size=batch_size, max_length=seq_len, chunk_budget_gb=64)
    tokens = sum(c.prepared.n_tokens for c in ours.chunks)
    assert tokens == batch_size * n_batches * seq_len

    @torch.no_grad()
    def plain():
        for chunk in ours.chunks:
            for batch in chunk.prepared.batches:
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)

    plain()  # warm-up
    ours.evaluate(())
    seconds = {"plain": [], "ours": []}
    for r in range(repeats):
        for key in ("plain", "ours")[r % 2 :] + ("plain", "ours")[: r % 2]:
            seconds[key].append(_timed(plain if key == "plain" else lambda: ours.evaluate(()))[1])
    middle = (config.num_hidden_layers // 2,)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pair_seconds = _timed(lambda: ours.evaluate_many([(), middle]))[1]
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    alone_seconds = _timed(lambda: (ours.evaluate(()), ours.evaluate(middle)))[1]
    per_token, peak = flops_per_token(model, seq_len), peak_flops(device, peak_tflops)
    out = {
        "shape": {"family": "llama", **shape},
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_pass": tokens,
        "repeats": repeats,
        "gflop_per_token": per_token / 1e9,
        "peak_tflops": peak / 1e12 if peak else None,
        "kept_on": str(ours.storage_device()),
        "peak_memory_mb": peak_memory,
        "stepwide_speedup_baseline_and_middle_block": alone_seconds / pair_seconds,
    }
    for key, values in seconds.items():
        rate = tokens / statistics.median(values)
        out[key] = {"tokens_per_s": rate, "tflops": rate * per_token / 1e12, "mfu": rate * per_token / peak if peak else None}
    out["ours_vs_plain"] = out["ours"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    return out


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


def summary(results: dict) -> dict:
    """The top-level keys other tools read."""
    flat = {"device": results.get("device")}
    if "sensitivity" in results:
        flat |= {
            "sensitivity_speedup": results["sensitivity"]["speedup"],
            "sensitivity_max_abs_diff": results["sensitivity"]["max_abs_diff"],
        }
    if "scale_sensitivity" in results:
        flat |= {
            "scale_sensitivity_speedup": results["scale_sensitivity"]["speedup"],
            "scale_max_abs_diff": results["scale_sensitivity"]["max_abs_diff"],
        }
    if "sublayer_sensitivity" in results:
        flat |= {
            "sublayer_sensitivity_speedup": results["sublayer_sensitivity"]["speedup"],
            "sublayer_sensitivity_max_abs_diff": results["sublayer_sensitivity"]["max_abs_diff"],
        }
    if "racing" in results:
        flat |= {
            "racing_eval_ratio": results["racing"]["eval_ratio"],
            "racing_same_recommendations": results["racing"]["same_recommendations"],
        }
    if "multiple_choice" in results:
        flat |= {
            "mc_speedup_vs_lm_eval": results["multiple_choice"]["speedup"],
            "mc_acc_equal": results["multiple_choice"]["acc_equal"],
        }
    if "forward" in results:
        flat |= {"mfu": results["forward"]["ours"]["mfu"], "mfu_plain_transformers": results["forward"]["plain"]["mfu"]}
    if "scoring" in results:
        flat |= {
            "scoring_compiled_speedup": results["scoring"]["compiled_speedup"],
            "scoring_flex_speedup": results["scoring"]["flex_speedup"],
        }
    if "gpu_scoring" in results:
        g = results["gpu_scoring"]
        flat |= {
            "gpu_scoring_tokens_per_s": g["paths"]["compiled_flex"]["tokens_per_s"],
            "gpu_scoring_mfu": g["paths"]["compiled_flex"]["mfu"],
            "gpu_compiled_speedup": g["compiled_speedup"],
            "gpu_flex_speedup": g["flex_speedup"],
            "gpu_scoring_device": g["device"],
            "gpu_scoring_date": g["date"],
        }
    return flat


def _samples(part: dict) -> str:
    """Examples per task of a measurement, e.g. `piqa 4, arc_easy 4`."""
    return ", ".join(f"{k} {v['n']}" for k, v in part["tasks"].items())


def markdown(results: dict) -> str:
    """The results as a Markdown table, one row per measurement."""
    rows = [
        "| measurement | ours | baseline | ratio | target | samples | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, label, target in (
        ("sensitivity", "whole-data budget", ">= 1.5x, identical"),
        ("scale_sensitivity", "budget of 1/30 of the data's block states", ">= 1.5x, identical"),
        ("sublayer_sensitivity", "whole-data budget", ">= 1.5x, identical"),
    ):
        if key in results:
            r = results[key]
            samples = _samples(r)
            what = "sublayer sensitivity study (attention and MLP)" if key == "sublayer_sensitivity" else "sensitivity study"
            rows.append(
                f"| {what}, {r['configs']} configurations, step-wide vs each alone ({label}: "
                f"{r['chunks']} chunks, kept states <= {r['kept_states_mb']:.0f} of {r['dataset_states_mb']:.0f} MB) "
                f"| {r['seconds_stepwide']:.1f} s | {r['seconds_from_scratch']:.1f} s | {r['speedup']:.2f}x "
                f"(max abs diff {r['max_abs_diff']:.1g}) | {target} | {samples} | {r['device']} | {r['date']} |"
            )
    if "racing" in results:
        r = results["racing"]
        samples = _samples(r)
        rows.append(
            f"| beam search (width {r['beam_width']}, up to {r['max_removed']} removed), racing vs exhaustive: "
            f"example-configurations scored ({r['racing']['stopped']} candidates stopped) "
            f"| {r['racing']['example_configs']:,} ({r['racing']['seconds']:.0f} s) "
            f"| {r['exhaustive']['example_configs']:,} ({r['exhaustive']['seconds']:.0f} s) "
            f"| {r['eval_ratio']:.2f}x fewer (at most {r['eval_ratio_ceiling']:.2f}x at this size), {r['speedup']:.2f}x "
            f"faster (same recommendations: {'yes' if r['same_recommendations'] else 'NO'}) | >= 3x, identical | {samples} "
            f"| {r['device']} | {r['date']} |"
        )
    if "multiple_choice" in results:
        m = results["multiple_choice"]
        samples = _samples(m)
        accs = "; ".join(
            f"{k} acc {v['acc']:.3f}/{v['acc_lm_eval']:.3f}, acc_norm {v['acc_norm']:.3f}/{v['acc_norm_lm_eval']:.3f}"
            for k, v in m["tasks"].items()
        )
        rows.append(
            f"| multiple choice vs lm-eval's HFLM.loglikelihood ({accs}) | {m['seconds_ours']:.1f} s "
            f"| {m['seconds_lm_eval']:.1f} s "
            f"| {m['speedup']:.2f}x (identical: {'yes' if m['acc_equal'] else 'NO'}) | >= 2x, identical "
            f"| {samples} x {m['repeats']} | {m['device']} | {m['date']} |"
        )
    if "forward" in results:
        f = results["forward"]

        def rate(r):
            mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
            return f"{r['tokens_per_s']:,.0f} tok/s, {r['tflops']:.0f} TFLOP/s{mfu}"

        samples = f"{f['tokens_per_pass']:,} tokens ({f['batch_size']} x {f['seq_len']}) x {f['repeats']}"
        shape = {k: v for k, v in f["shape"].items() if k != "family"}
        model = "Llama-3-8B shape" if shape == LLAMA3_8B else f"{shape['num_hidden_layers']} x {shape['hidden_size']} Llama"
        rows.append(
            f"| forward, random {model}, {f['dtype']} (ours: scoring) | {rate(f['ours'])} | {rate(f['plain'])} "
            f"| {f['ours_vs_plain']:.3f} | >= 1 | {samples} | {f['device']} | {f['date']} |"
        )
        rows.append(
            f"| forward: baseline and the middle block's removal step-wide vs each alone (states on {f['kept_on']}) "
            f"| | | {f['stepwide_speedup_baseline_and_middle_block']:.2f}x | | {samples} | {f['device']} | {f['date']} |"
        )
    for key in ("scoring", "gpu_scoring"):
        if key in results:
            r = results[key]
            paths = r["paths"]

            def rate(p):
                mfu = f", MFU {p['mfu']:.1%} ({p['matmul_fraction']:.0%} of matmul)" if p.get("mfu") is not None else ""
                return f"{p['tokens_per_s']:,.0f} tok/s{mfu}, compiling {p['compile_seconds']:.0f} s"

            model = "random Llama-3-8B shape, bf16" if key == "gpu_scoring" else f"{r['model']}, {r['dtype']}"
            rows.append(
                f"| scoring ({model}): compiled + flex_attention packed rows / compiled / eager "
                f"| {rate(paths['compiled_flex'])} / {rate(paths['compiled'])} | {rate(paths['eager'])} "
                f"| {r['total_speedup']:.2f}x (compiled {r['compiled_speedup']:.2f}x, flex {r['flex_speedup']:.2f}x; "
                f"acc identical: {'yes' if r['acc_equal'] else 'NO'}, max ll diff "
                f"{max(p['max_abs_ll_diff'] for p in paths.values()):.1g}) | 60% MFU on GPU, identical "
                f"| {_samples(r)} | {r['device']} | {r['date']} |"
            )
    versions = results.get("versions", {})
    return "\n".join(rows) + "\n\n" + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n"


@dataclasses.dataclass
class BenchmarkSettings:
    """What to measure, where, and where the results go."""

    quick: bool = setting(False, "few samples (minutes on a CPU)")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N (parts 1 and 2)")
    gpu_only: bool = setting(False, "run only the CUDA parts (forward, gpu_scoring)")
    data_dir: str = setting("", f"folder with piqa and arc_easy JSONL; empty: ${DATA_DIR_ENV}, ../shared/data, else generated")
    batch_size: int = setting(8, "requests per forward pass")
    peak_tflops: float = setting(0.0, "accelerator's dense bf16 peak, for MFU; 0: known GPUs only")
    threads: int = setting(0, "CPU threads for torch; 0: torch's own")
    out: str = setting(str(RESULTS), "folder for latest.json and latest.md")
    parts: str = setting(",".join(PARTS), f"comma-separated parts to run, of {', '.join(PARTS)}")


def main(argv=None) -> None:
    """Run the chosen parts and write the results."""
    parser = cli.parser_for(BenchmarkSettings, description=__doc__.split("\n")[0])
    args = cli.settings_from(BenchmarkSettings, parser.parse_args(argv))
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        raise cli.UsageError(f"unknown part {sorted(parts - set(PARTS))[0]!r}; allowed: {', '.join(PARTS)}")
    if args.gpu_only and not torch.cuda.is_available():
        raise cli.UsageError("gpu_only needs a CUDA device")
    sizes = SIZES[args.quick]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    latest = out / "latest.json"
    results = json.loads(latest.read_text()) if latest.is_file() else {}
    results["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": importlib.metadata.version("lm_eval"),
    }
    if args.gpu_only:
        parts &= set(GPU_PARTS)
    if parts - set(GPU_PARTS):
        loaded = load_model("default", device=args.device, dtype="float32")
        results["device"] = machine(loaded.device)
        with tempfile.TemporaryDirectory() as scratch:
            folder, source = data_dir(args.data_dir, sizes["mc_n"], Path(scratch))
            tasks = [load_task(name, "validation", sizes["sensitivity_n"], seed=0, data_dir=folder) for name in MC_TASKS]
            for part, key, unit in (("sensitivity", "sensitivity", "block"), ("sublayer", "sublayer_sensitivity", "sublayer")):
                if part in parts:
                    print(f"{key}: {loaded.name}, {loaded.num_blocks} blocks, tasks {[t.name for t in tasks]} ...", flush=True)
                    results[key] = {
                        **bench_sensitivity(loaded, tasks, args.batch_size, removal_unit=unit),
                        **_stamp(loaded.device),
                        "model": loaded.name,
                        "data": source,
                        "dtype": "float32",
                    }
            if "scale" in parts:
                names, real = real_tasks(SCALE_TASKS, args.data_dir)
                scale = [load_task(name, "validation", sizes["scale_n"], seed=0, data_dir=real) for name in names]
                print(f"sensitivity at user-scale proportions: {names} ...", flush=True)
                results["scale_sensitivity"] = {
                    **bench_sensitivity(loaded, scale, args.batch_size, SCALE_BUDGET_SHARE),
                    **_stamp(loaded.device),
                    "model": loaded.name,
                    "data": real or "builtin",
                    "dtype": "float32",
                }
            if "racing" in parts:
                names, real = real_tasks(sizes["racing_tasks"], args.data_dir)
                print(f"beam search, racing vs exhaustive: {names} ...", flush=True)
                results["racing"] = {
                    **bench_racing(
                        "default",
                        names,
                        sizes["racing_n"],
                        real or "",
                        sizes["racing_width"],
                        sizes["racing_removed"],
                        args.batch_size,
                    ),
                    **_stamp(loaded.device),
                    "model": loaded.name,
                    "data": real or "builtin",
                }
            if "scoring" in parts:
                scoring = [load_task(name, "validation", sizes["scoring_n"], seed=0, data_dir=folder) for name in MC_TASKS]
                print("scoring paths: eager, compiled, compiled + flex_attention ...", flush=True)
                results["scoring"] = {
                    **bench_scoring(loaded, scoring, args.batch_size),
                    **_stamp(loaded.device),
                    "model": loaded.name,
                    "data": source,
                    "dtype": "float32",
                }
            print(json.dumps(summary(results)), flush=True)
            if "mc" in parts:
                print("multiple choice vs lm-eval ...", flush=True)
                results["multiple_choice"] = {
                    **bench_mc(loaded, sizes["mc_n"], folder, args.batch_size, sizes["mc_repeats"]),
                    **_stamp(loaded.device),
                    "model": loaded.name,
                    "data": source,
                    "dtype": "float32",
                }
        del loaded
    if torch.cuda.is_available() and "forward" in parts:
        device = torch.device("cuda")
        print("forward throughput, random Llama-3-8B shape ...", flush=True)
        results["device"] = machine(device)
        results["forward"] = {
            **bench_forward(device, n_batches=sizes["gpu_batches"], repeats=3, peak_tflops=args.peak_tflops),
            **_stamp(device),
        }
    if torch.cuda.is_available() and "gpu_scoring" in parts:
        device = torch.device("cuda")
        print("scoring paths, random Llama-3-8B shape ...", flush=True)
        results["gpu_scoring"] = {
            **bench_gpu_scoring(device, sizes["gpu_scoring_n"], args.data_dir or None, args.batch_size, args.peak_tflops),
            **_stamp(device),
        }
    results |= summary(results)
    out.mkdir(parents=True, exist_ok=True)
    latest.write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    raise SystemExit(cli.run_main(main))
