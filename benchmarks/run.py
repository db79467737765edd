"""Speed of the scorer, as ratios measured within one run on the same model and data.

    python -m benchmarks.run [--quick] [--device auto] [--gpu-only]

1. sensitivity: the baseline and every single-block removal of the default model, with
   activation reuse and without (each configuration timed back to back, order alternating);
   speedup and the largest difference of any metric or per-example value.
2. multiple choice: our scorer against lm-eval-harness's own HF model class (`HFLM`) scoring
   the requests lm-eval's task builds, on the same documents; speedup, and whether acc and
   acc_norm (per document, by lm-eval's `process_results`) are identical. Both in float32,
   batch size 8 (lm-eval: 8 requests; ours: 8 rows, a row holding the choices of several
   examples, about 256 tokens).
3. on CUDA only: tokens/s and model FLOPs utilisation of the forward pass of a random-weight
   model of Llama-3-8B's shape in bf16 (built from its config, nothing downloaded): plain
   transformers (`model(input_ids)`, logits only), our scorer (float32 log-likelihood of every
   position) and our scorer while keeping activations for reuse.

Writes benchmarks/results/latest.json and latest.md. A part that did not run keeps its
previous numbers there, each part with its own machine and date.
"""

from __future__ import annotations

import argparse
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

from pruning.evaluate import Evaluator
from pruning.models import LoadedModel, find_blocks_path, load_model
from pruning.tasks import Document, Task, builtin, load_task
from pruning.tasks.harness import DATA_DIR_ENV, build_lm_eval_task

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"
MC_TASKS = ("piqa", "arc_easy")
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
# dense bf16 datasheet peaks, TFLOP/s; the first name contained in the device name wins
PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}
SIZES = {  # examples per task (sensitivity, multiple choice); GPU batches of 8 x 1024 tokens
    True: {"sensitivity_n": 4, "mc_n": 24, "gpu_batches": 4, "mc_repeats": 1},
    False: {"sensitivity_n": 50, "mc_n": 200, "gpu_batches": 8, "mc_repeats": 2},
}


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
    return {"device": machine(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


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
            f.write(json.dumps({"id": str(ex.doc_id), "question": ex.requests[0][0][-120:],
                                "choices": {"text": [c.strip() for _, c in ex.requests], "label": list("ABCD")},
                                "answerKey": "ABCD"[ex.gold]}) + "\n")


def data_dir(requested: str | None, n: int, scratch: Path) -> tuple[str, str]:
    """(folder with piqa and arc_easy JSONL, where it came from)."""
    for folder in filter(None, (requested, os.environ.get(DATA_DIR_ENV), str(SHARED_DATA))):
        if all((Path(folder) / t / "validation.jsonl").is_file() for t in MC_TASKS):
            return folder, f"real subsets from {folder}"
    write_layouts(scratch, n)
    return str(scratch), "generated from the builtin pydoc cloze items (real subsets absent)"


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
    Evaluator(loaded, [dataclasses.replace(task, examples=task.examples[:2])], batch_size, reuse=False).evaluate(())


def _block_runs(num_blocks: int, stored: list[int]) -> int:
    """Blocks run per token by a sensitivity study that starts each removal of block k after
    the last stored block below k."""
    skipped = [max((j + 1 for j in stored if j < k), default=0) for k in range(num_blocks)]
    return num_blocks + sum(num_blocks - 1 - s for s in skipped)


def bench_sensitivity(loaded: LoadedModel, tasks: list[Task], batch_size: int) -> dict:
    """Baseline + every single-block removal, with and without activation reuse, task by task."""
    configs = [()] + [(i,) for i in range(loaded.num_blocks)]
    per_task = {}
    _warm_up(loaded, tasks[0], batch_size)
    for task in tasks:
        fast = Evaluator(loaded, [task], batch_size, reuse=True)
        slow = Evaluator(loaded, [task], batch_size, reuse=False)
        seconds = {"reuse": 0.0, "no_reuse": 0.0}
        diff = 0.0
        for k, removed in enumerate(configs):
            runs = [("reuse", fast), ("no_reuse", slow)][:: 1 if k % 2 == 0 else -1]
            out = {}
            for name, evaluator in runs:
                out[name], spent = _timed(lambda e=evaluator: e.evaluate(removed))
                seconds[name] += spent
            diff = max(diff, float(np.abs(_numbers(out["reuse"]) - _numbers(out["no_reuse"])).max()))
        per_task[task.name] = {"n": len(task.examples), "tokens_per_pass": slow.prepared[0].n_tokens,
                               "scored_tokens_per_pass": sum(len(b.targets) for b in slow.prepared[0].batches),
                               "seconds_reuse": seconds["reuse"], "seconds_no_reuse": seconds["no_reuse"],
                               "speedup": seconds["no_reuse"] / seconds["reuse"], "max_abs_diff": diff,
                               "stored_blocks": len(fast.stored_blocks),
                               "speedup_if_only_blocks_cost": _block_runs(loaded.num_blocks, []) / _block_runs(
                                   loaded.num_blocks, fast.stored_blocks)}
    reuse = sum(t["seconds_reuse"] for t in per_task.values())
    no_reuse = sum(t["seconds_no_reuse"] for t in per_task.values())
    return {"tasks": per_task, "configs": len(configs), "seconds_reuse": reuse, "seconds_no_reuse": no_reuse,
            "speedup": no_reuse / reuse, "max_abs_diff": max(t["max_abs_diff"] for t in per_task.values())}


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
        requests = [Instance("loglikelihood", docs[ex.doc_id], req, j, (name, ex.doc_id, 1))
                    for ex in task.examples for j, req in enumerate(ex.requests)]
        if not per_task:
            _warm_up(loaded, task, batch_size)
            lm.loglikelihood(requests[:4], disable_tqdm=True)
        runs = {
            "ours": lambda: Evaluator(loaded, [task], batch_size, reuse=False).evaluate(())[name],
            "lm_eval": lambda: lm.loglikelihood(requests, disable_tqdm=True),
        }
        seconds, result = {"ours": 0.0, "lm_eval": 0.0}, {}
        for _ in range(repeats):
            for key in (("ours", "lm_eval") if turn % 2 == 0 else ("lm_eval", "ours")):
                result[key], spent = _timed(runs[key])
                seconds[key] += spent
            turn += 1
        ours, theirs, start = result["ours"], [], 0
        for ex in task.examples:
            theirs.append(lm_task.process_results(docs[ex.doc_id], result["lm_eval"][start : start + len(ex.requests)]))
            start += len(ex.requests)
        metrics = {m: [int(doc[m]) for doc in theirs] for m in ("acc", "acc_norm")}
        per_task[name] = {
            "n": len(task.examples), "requests": len(requests),
            "seconds_ours": seconds["ours"], "seconds_lm_eval": seconds["lm_eval"],
            "acc": ours.metrics["acc"], "acc_norm": ours.metrics["acc_norm"],
            "acc_lm_eval": float(np.mean(metrics["acc"])), "acc_norm_lm_eval": float(np.mean(metrics["acc_norm"])),
            "identical": all(metrics[m] == ours.per_example[m] for m in metrics),
        }
    total_ours = sum(t["seconds_ours"] for t in per_task.values())
    total_theirs = sum(t["seconds_lm_eval"] for t in per_task.values())
    return {"tasks": per_task, "repeats": repeats, "seconds_ours": total_ours, "seconds_lm_eval": total_theirs,
            "speedup": total_theirs / total_ours, "acc_equal": all(t["identical"] for t in per_task.values())}


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


def bench_forward(device: torch.device, shape: dict = LLAMA3_8B, batch_size: int = 8, seq_len: int = 1024,
                  n_batches: int = 8, repeats: int = 3, peak_tflops: float | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> dict:
    """Forward throughput and MFU: plain transformers, our scorer, our scorer keeping activations."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    loaded = LoadedModel(model, word_tokenizer(config.vocab_size), "random-llama", "random", find_blocks_path(model))
    words = torch.randint(1, config.vocab_size, (batch_size * n_batches, seq_len), generator=torch.Generator().manual_seed(0))
    task = Task("random_tokens", "validation", "perplexity",
                [Document(i, " ".join(f"w{t}" for t in row)) for i, row in enumerate(words.tolist())], source="generated")
    settings = dict(batch_size=batch_size, max_length=seq_len, reuse_budget_gb=64)
    ours = Evaluator(loaded, [task], reuse=False, **settings)
    tokens = ours.prepared[0].n_tokens
    assert tokens == batch_size * n_batches * seq_len

    @torch.no_grad()
    def plain():
        for batch in ours.prepared[0].batches:
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)

    def recording():
        fresh = Evaluator(loaded, [task], reuse=True, **settings)
        return fresh, _timed(lambda: fresh.evaluate(()))[1]

    plain()  # warm-up
    ours.evaluate(())
    seconds = {"plain": [], "ours": [], "ours_recording": []}
    recorder = None
    for r in range(repeats):
        for key in ("plain", "ours", "ours_recording")[r % 3:] + ("plain", "ours", "ours_recording")[: r % 3]:
            if key == "ours_recording":
                recorder = None  # free the previous run's kept activations first
                recorder, spent = recording()
            else:
                spent = _timed(plain if key == "plain" else lambda: ours.evaluate(()))[1]
            seconds[key].append(spent)
    middle = (config.num_hidden_layers // 2,)
    replay_seconds = _timed(lambda: recorder.evaluate(middle))[1]
    scratch_seconds = _timed(lambda: ours.evaluate(middle))[1]
    per_token, peak = flops_per_token(model, seq_len), peak_flops(device, peak_tflops)
    out = {"shape": {"family": "llama", **shape}, "dtype": str(dtype).removeprefix("torch."),
           "batch_size": batch_size, "seq_len": seq_len, "tokens_per_pass": tokens, "repeats": repeats,
           "gflop_per_token": per_token / 1e9, "peak_tflops": peak / 1e12 if peak else None,
           "kept_on": str(recorder.storage_device()), "stored_blocks": len(recorder.stored_blocks),
           "replay_speedup_remove_middle_block": scratch_seconds / replay_seconds}
    for key, values in seconds.items():
        rate = tokens / statistics.median(values)
        out[key] = {"tokens_per_s": rate, "tflops": rate * per_token / 1e12, "mfu": rate * per_token / peak if peak else None}
    out["ours_vs_plain"] = out["ours"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    return out


def summary(results: dict) -> dict:
    """The top-level keys other tools read."""
    flat = {"device": results.get("device")}
    if "sensitivity" in results:
        flat |= {"sensitivity_speedup": results["sensitivity"]["speedup"],
                 "sensitivity_max_abs_diff": results["sensitivity"]["max_abs_diff"]}
    if "multiple_choice" in results:
        flat |= {"mc_speedup_vs_lm_eval": results["multiple_choice"]["speedup"],
                 "mc_acc_equal": results["multiple_choice"]["acc_equal"]}
    if "forward" in results:
        flat |= {"mfu": results["forward"]["ours"]["mfu"], "mfu_plain_transformers": results["forward"]["plain"]["mfu"]}
    return flat


def markdown(results: dict) -> str:
    """The results as a Markdown table, one row per measurement."""
    rows = ["| measurement | ours | baseline | ratio | target | samples | machine | date |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if "sensitivity" in results:
        s = results["sensitivity"]
        for name, t in [("all tasks", s), *s["tasks"].items()]:
            if t is s:
                samples = ", ".join(f"{k} {v['n']}" for k, v in s["tasks"].items())
                bound = ""
            else:
                samples = f"{t['n']} ({t['scored_tokens_per_pass']} of {t['tokens_per_pass']} tokens scored)"
                bound = f", {t['speedup_if_only_blocks_cost']:.2f}x if only blocks cost"
            rows.append(f"| sensitivity study, {s['configs']} configurations, reuse vs from scratch: {name} "
                        f"| {t['seconds_reuse']:.1f} s | {t['seconds_no_reuse']:.1f} s | {t['speedup']:.2f}x "
                        f"(max abs diff {t['max_abs_diff']:.1g}{bound}) | >= 1.8x, identical | {samples} "
                        f"| {s['device']} | {s['date']} |")
    if "multiple_choice" in results:
        m = results["multiple_choice"]
        samples = ", ".join(f"{k} {v['n']}" for k, v in m["tasks"].items())
        accs = "; ".join(f"{k} acc {v['acc']:.3f}/{v['acc_lm_eval']:.3f}, acc_norm {v['acc_norm']:.3f}/{v['acc_norm_lm_eval']:.3f}"
                         for k, v in m["tasks"].items())
        rows.append(f"| multiple choice vs lm-eval's HFLM.loglikelihood ({accs}) | {m['seconds_ours']:.1f} s | {m['seconds_lm_eval']:.1f} s "
                    f"| {m['speedup']:.2f}x (identical: {'yes' if m['acc_equal'] else 'NO'}) | >= 2x, identical "
                    f"| {samples} x {m['repeats']} | {m['device']} | {m['date']} |")
    if "forward" in results:
        f = results["forward"]

        def rate(r):
            mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
            return f"{r['tokens_per_s']:,.0f} tok/s, {r['tflops']:.0f} TFLOP/s{mfu}"

        samples = f"{f['tokens_per_pass']:,} tokens ({f['batch_size']} x {f['seq_len']}) x {f['repeats']}"
        shape = {k: v for k, v in f["shape"].items() if k != "family"}
        model = "Llama-3-8B shape" if shape == LLAMA3_8B else f"{shape['num_hidden_layers']} x {shape['hidden_size']} Llama"
        rows.append(f"| forward, random {model}, {f['dtype']} (ours: scoring) | {rate(f['ours'])} | {rate(f['plain'])} "
                    f"| {f['ours_vs_plain']:.3f} | >= 1 | {samples} | {f['device']} | {f['date']} |")
        rows.append(f"| forward while keeping activations for reuse (kept on {f['kept_on']}) | {rate(f['ours_recording'])} "
                    f"| {rate(f['plain'])} | {f['ours_recording']['tokens_per_s'] / f['plain']['tokens_per_s']:.3f} | >= 1 "
                    f"| {samples} | {f['device']} | {f['date']} |")
        rows.append(f"| remove the middle block: from kept activations vs from scratch | | | "
                    f"{f['replay_speedup_remove_middle_block']:.2f}x | | {samples} | {f['device']} | {f['date']} |")
    versions = results.get("versions", {})
    return "\n".join(rows) + "\n\n" + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples (minutes on a CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (parts 1 and 2)")
    parser.add_argument("--gpu-only", action="store_true", help="run only part 3 (needs CUDA)")
    parser.add_argument("--data-dir", default=None, help=f"folder with piqa and arc_easy JSONL (default ${DATA_DIR_ENV}, "
                                                         "../shared/data, else generated)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator's dense bf16 peak, for MFU")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own; 1 with --quick, steadier on a shared machine)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.gpu_only and not torch.cuda.is_available():
        parser.error("--gpu-only needs a CUDA device")
    sizes = SIZES[args.quick]
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out)
    latest = out / "latest.json"
    results = json.loads(latest.read_text()) if latest.is_file() else {}
    results["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "lm_eval": importlib.metadata.version("lm_eval")}
    if not args.gpu_only:
        loaded = load_model("default", device=args.device, dtype="float32")
        results["device"] = machine(loaded.device)
        with tempfile.TemporaryDirectory() as scratch:
            folder, source = data_dir(args.data_dir, sizes["mc_n"], Path(scratch))
            tasks = [load_task(name, "validation", sizes["sensitivity_n"], seed=0, data_dir=folder) for name in MC_TASKS]
            print(f"sensitivity: {loaded.name}, {loaded.num_blocks} blocks, tasks {[t.name for t in tasks]} ...", flush=True)
            results["sensitivity"] = {**bench_sensitivity(loaded, tasks, args.batch_size), **_stamp(loaded.device),
                                      "model": loaded.name, "data": source, "dtype": "float32"}
            print(json.dumps(summary(results)), flush=True)
            print("multiple choice vs lm-eval ...", flush=True)
            results["multiple_choice"] = {**bench_mc(loaded, sizes["mc_n"], folder, args.batch_size, sizes["mc_repeats"]),
                                          **_stamp(loaded.device), "model": loaded.name, "data": source, "dtype": "float32"}
        del loaded
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print("forward throughput, random Llama-3-8B shape ...", flush=True)
        results["device"] = machine(device)
        results["forward"] = {**bench_forward(device, n_batches=sizes["gpu_batches"], repeats=3,
                                              peak_tflops=args.peak_tflops), **_stamp(device)}
    results |= summary(results)
    out.mkdir(parents=True, exist_ok=True)
    latest.write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
