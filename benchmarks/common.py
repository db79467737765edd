"""What the benchmark's parts share: where results and data live, the machine and date stamp, timing,
the multiple-choice data (real subsets, else generated), and FLOP counts of Llama-shaped models."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pruning.evaluate import Evaluator
from pruning.models import LoadedModel
from pruning.tasks import Task, builtin
from pruning.tasks.harness import DATA_DIR_ENV

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
