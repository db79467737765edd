"""Dense and pruned models timed against each other (prefill, decode), their peak memory, and `speed.json`."""

from __future__ import annotations

import inspect
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pruning.encoding import max_length_of
from pruning.export_units import ships_code
from pruning.models import LoadedModel, load_model
from search import speedup
from search.cli import SearchError
from search.settings import SpeedSettings

if TYPE_CHECKING:
    from search.export_model import Exported


def check_lengths(loaded: LoadedModel, speed: SpeedSettings) -> None:
    limit = max_length_of(loaded.model)
    if speed.prompt_len + speed.new_tokens > limit:
        raise SearchError(
            f"prompt_len {speed.prompt_len} + new_tokens {speed.new_tokens} exceeds the model's context "
            f"{limit}; allowed: a sum of at most {limit}"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(loaded: LoadedModel, speed: SpeedSettings) -> torch.Tensor:
    """`batch` x `prompt_len` random token ids, the same for every model of the same vocabulary."""
    vocab = loaded.model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (speed.speed_batch, speed.prompt_len), generator=torch.Generator().manual_seed(0))
    return ids.to(loaded.device)


@torch.inference_mode()
def _generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds): one forward pass over the prompts that fills the KV cache,
    then `new_tokens` greedy steps of one token each."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    _sync(ids.device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **keep)
    token = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return prefilled - start, time.perf_counter() - prefilled


def measure(dense: LoadedModel, pruned: LoadedModel, speed: SpeedSettings) -> dict[str, dict]:
    """Size and speed of both models: one warm-up each, then rounds that alternate dense and pruned
    (so drift of a shared machine hits both alike), at least `repeats`, until both speedups' intervals
    are within ±5% (search.speedup) or `max_repeats`; per side the medians and every round's times."""
    sides = {"dense": dense, "pruned": pruned}
    ids = {name: random_prompts(loaded, speed) for name, loaded in sides.items()}
    times = {name: [] for name in sides}
    for round_ in range(speed.max_repeats + 1):
        for name, loaded in sides.items():
            timing = _generate(loaded.model, ids[name], speed.new_tokens)
            if round_:  # round 0 is the warm-up
                times[name].append(timing)
        if round_ >= speed.repeats and all(
            speedup.tight(speedup.ratio_interval([t[i] for t in times["dense"]], [t[i] for t in times["pruned"]])) for i in (0, 1)
        ):
            break
    out = {}
    for name, loaded in sides.items():
        prefill, decode = zip(*times[name])
        p, d = statistics.median(prefill), statistics.median(decode)
        params = list(loaded.model.parameters())
        out[name] = {
            "n_params": sum(t.numel() for t in params),
            "n_block_params": speedup.block_parameters(loaded.model),
            "weight_mb": sum(t.numel() * t.element_size() for t in params) / 2**20,
            "prefill_tokens_per_s": speed.speed_batch * speed.prompt_len / p,
            "decode_tokens_per_s": speed.speed_batch * speed.new_tokens / d,
            "decode_ms_per_token": 1000 * d / speed.new_tokens,
            "prefill_seconds": list(prefill),
            "decode_seconds": list(decode),
        }
    return out


def peak_memory(models: list[LoadedModel], speed: SpeedSettings, sources: list[tuple[str, str | None]]) -> list[float]:
    """Peak memory (MiB) of one prefill + decode pass of each model. CUDA: the weights plus the most the
    pass allocated beyond them (torch's allocator statistics). CPU: the peak resident memory (VmHWM) of a
    fresh process that loads the model from its (source, revision) and runs the pass, Python and torch
    included (the processes run side by side)."""
    if models[0].device.type == "cuda":
        return [_cuda_peak(loaded, speed) for loaded in models]
    dtype = str(next(models[0].model.parameters()).dtype).removeprefix("torch.")
    code = "import sys; from search.export_timing import _child_peak; print(_child_peak(*sys.argv[1:]))"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, source, dtype, revision or "", json.dumps(speed.speed_settings())],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for source, revision in sources
    ]
    peaks = []
    for child in children:
        out, err = child.communicate()
        if child.returncode:
            reason = err.strip().splitlines()[-1] if err.strip() else child.returncode
            raise RuntimeError(f"peak memory measurement failed: {reason}")
        peaks.append(float(out.split()[-1]))
    return peaks


def _cuda_peak(loaded: LoadedModel, speed: SpeedSettings) -> float:
    torch.cuda.synchronize(loaded.device)
    before = torch.cuda.memory_allocated(loaded.device)
    torch.cuda.reset_peak_memory_stats(loaded.device)
    _generate(loaded.model, random_prompts(loaded, speed), speed.new_tokens)
    weights = sum(t.numel() * t.element_size() for t in loaded.model.parameters())
    return (weights + torch.cuda.max_memory_allocated(loaded.device) - before) / 2**20


def _child_peak(source: str, dtype: str, revision: str, speed: str) -> float:
    """In a fresh process: load on the CPU, run one prefill + decode pass, return the peak RSS in MiB."""
    settings = SpeedSettings(**json.loads(speed))
    loaded = load_model(source, device="cpu", dtype=dtype, revision=revision or None, trust_remote_code=ships_code(source))
    _generate(loaded.model, random_prompts(loaded, settings), settings.new_tokens)
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def speed_report(exported: Exported, speed: SpeedSettings) -> dict:
    """`speed.json`: the settings, the machine, both sides' measurements and the ratios."""
    import transformers

    device = exported.loaded.device
    dense, pruned = exported.speed["dense"], exported.speed["pruned"]
    return {
        "settings": {
            **{name.removeprefix("speed_"): value for name, value in speed.speed_settings().items()},
            "warmup": 1,
            "rounds": len(dense["prefill_seconds"]),
            "statistic": "tokens/s: median; speedup: geometric mean of the paired round ratios, 95% t interval",
            "order": "dense and pruned alternate",
            "prompts": "random token ids, seed 0",
            "decode": "greedy, one token per step, KV cache",
        },
        "device": str(device),
        "dtype": str(next(exported.loaded.model.parameters()).dtype).removeprefix("torch."),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
        ),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peak_memory": (
            "weights + peak allocated beyond them in one pass (torch.cuda)"
            if device.type == "cuda"
            else "peak RSS (VmHWM) of a fresh process that loads the model and runs one pass"
        ),
        "dense": dense,
        "pruned": pruned,
        **speedups(dense, pruned, speed),
    }


def speedups(dense: dict, pruned: dict, speed: SpeedSettings) -> dict:
    """`<phase>_speedup` with `_low`, `_high` (prefill, decode), `speedup_bound` (dense/pruned block
    parameters: the most the removal can give) and `warnings`, why a figure is not to be trusted."""
    bound = dense["n_block_params"] / pruned["n_block_params"]
    out, warnings = {"speedup_bound": bound}, []
    rounds = len(dense["prefill_seconds"])
    for phase in ("prefill", "decode"):
        interval = speedup.ratio_interval(dense[f"{phase}_seconds"], pruned[f"{phase}_seconds"])
        out[f"{phase}_speedup"], out[f"{phase}_speedup_low"], out[f"{phase}_speedup_high"] = interval
        warnings += speedup.warnings_for(phase, interval, bound, rounds, speed.max_repeats)
    return {**out, "warnings": warnings}
