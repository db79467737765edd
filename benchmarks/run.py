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
import importlib.metadata
import json
import tempfile
from pathlib import Path

import torch
import transformers

from benchmarks.common import MC_TASKS, RESULTS, SCALE_TASKS, _stamp, data_dir, machine, real_tasks
from benchmarks.forward import bench_forward
from benchmarks.multiple_choice import bench_mc
from benchmarks.report import markdown, summary
from benchmarks.scoring_paths import bench_gpu_scoring, bench_scoring
from benchmarks.sensitivity import bench_racing, bench_sensitivity
from contract import cli
from contract.cli import setting
from pruning.models import load_model
from pruning.tasks import load_task
from pruning.tasks.harness import DATA_DIR_ENV

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
        _default_model_parts(args, parts, sizes, results)
    _gpu_parts(args, parts, sizes, results)
    results |= summary(results)
    out.mkdir(parents=True, exist_ok=True)
    latest.write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    print(markdown(results))


def _default_model_parts(args: BenchmarkSettings, parts: set[str], sizes: dict, results: dict) -> None:
    """The parts on the default model, on the CPU or the named device, into `results`."""
    loaded = load_model("default", device=args.device, dtype="float32")
    results["device"] = machine(loaded.device)
    with tempfile.TemporaryDirectory() as scratch:
        folder, source = data_dir(args.data_dir, sizes["mc_n"], Path(scratch))
        _sensitivity_parts(loaded, args, parts, sizes, folder, source, results)
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


def _sensitivity_parts(
    loaded, args: BenchmarkSettings, parts: set[str], sizes: dict, folder: str, source: str, results: dict
) -> None:
    """Part 1: block and sublayer sensitivity with a whole-data budget, and at user-scale proportions."""
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


def _gpu_parts(args: BenchmarkSettings, parts: set[str], sizes: dict, results: dict) -> None:
    """Parts 3 and 5 (gpu_scoring), on CUDA only, into `results`."""
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


if __name__ == "__main__":
    raise SystemExit(cli.run_main(main))
