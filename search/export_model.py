"""Export a pruned model as a plain Hugging Face model and an MLflow model, measured against the dense one.

The source is a beam search run (its recommendation for `num_removed` units), a `prune` run (its
width-pruned `pruned_model/`, when every layer kept the same shape), or `model` with a `blocks` or `units`
list. Removed sublayers ship modeling code with the model (pruning.export_units).
Everything is computed before the run is created, so bad input or a model that cannot be exported
writes nothing: export (blocks physically removed, config consistent), reload the directory with
plain transformers and check its logits against the project's own pruned model, time dense and
pruned, re-score the source's tasks on the exported model. Then one run (`prunetrack.kind=export`)
gets the metrics, `speed.json` and the MLflow model `model/`, optionally registered.
"""

from __future__ import annotations

from contract import cli
from search.settings import ExportModelSettings
from search.settings import export_model_parser as parser

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load torch
    cli.check_args(parser)

import contextlib
import inspect
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from contract import names, tracking
from contract.records import BeamResults
from pruning.compile import use_compile
from pruning.encoding import max_length_of
from pruning.evaluate import Evaluator
from pruning.export_units import kv_cache_bytes_per_token, save_without_units, ships_code
from pruning.families import units_removed
from pruning.models import LoadedModel, check_blocks, load_model
from pruning.tasks import load_task, parse_task_list
from pruning.units import Config, UnitError, is_blocks_only, label, normalize, parse_units, removed_blocks
from search import monitoring, progress, speedup, summaries
from search.cli import SearchError, run_main

logger = logging.getLogger(__spec__.name)  # `python -m search.export_model` runs it as __main__: log under its own name

PROMPTS = ("The quick brown fox jumps over the lazy dog.", "def main():\n    return 0", "In 1905, Albert Einstein")
# Largest |logit difference| between the exported model and the project's pruned model, by dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@dataclass
class Source:
    """What to export: the dense model, the blocks and other units to remove, the tasks to re-score and where they come from."""

    model: str
    revision: str | None
    blocks_path: str | None
    tasks: list[str]
    split: str
    n_samples: int
    seed: int
    removed: tuple[int, ...] = ()
    units: Config = ()  # sublayers (or blocks) to remove besides `removed`
    kind: str = "blocks"  # beam_search, prune or blocks
    run_id: str = ""
    reference_run_id: str = ""  # the run whose metrics the re-scored exported model should match
    sample: str = "seeded"  # how the n_samples examples were taken: seeded or first


@dataclass
class SpeedSettings:
    """How dense and pruned models are timed: `batch` random prompts of `prompt_len` tokens, then
    `new_tokens` greedy decode steps with the KV cache; one warm-up, then at least `repeats` rounds,
    more until the speedups' intervals are tight (search.speedup), at most `max_repeats`
    (ExportModelSettings' speed_batch, prompt_len, new_tokens, repeats, max_repeats)."""

    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    max_repeats: int

    def check(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise SearchError(f"{name} {value} out of range; allowed: >= 1")
        if self.max_repeats < self.repeats:
            raise SearchError(f"max_repeats {self.max_repeats} is below repeats {self.repeats}; allowed: >= repeats")


@dataclass
class Exported:
    """The checked, exported model in `directory`, and what was measured before the run is created."""

    directory: Path
    loaded: LoadedModel
    removed: tuple[int, ...]  # whole blocks
    units: Config  # every unit removed, blocks included
    logit_diff: float
    speed: dict  # dense and pruned measurements (search.export_model.measure)

    @property
    def what(self) -> str:
        """`blocks [2,4] removed`, `units [a4,b20] removed` or `width-pruned`."""
        if not self.units:
            return "width-pruned"
        if is_blocks_only(self.units):
            return f"blocks [{','.join(map(str, self.removed))}] removed"
        return f"units [{label(self.units)}] removed"


def parse_blocks(text: str) -> tuple[int, ...]:
    """Block indices from `3,5,7`."""
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise SearchError(f"blocks {text!r} is not a list of block indices; allowed: e.g. 3,5,7") from None


def source_of(client, args) -> Source:
    """The source named by `run_id` (a beam search or prune run) or by `model` and `blocks` and/or `units`; checked,
    no run created."""
    from mlflow.exceptions import MlflowException

    if args.run_id and (args.blocks or args.units):
        raise SearchError("pass run_id=<beam search or prune run> or blocks=<list>/units=<list>, not both")
    if not args.run_id:
        if not (args.blocks or args.units):
            raise SearchError(
                "nothing to export: pass run_id=<beam search or prune run>, blocks=<list, e.g. 3,5> "
                "or units=<list, e.g. a4,m13,b20>"
            )
        try:
            units = normalize(parse_units(args.units))
        except UnitError as err:
            raise SearchError(str(err)) from None
        return Source(
            args.model,
            args.revision or None,
            args.blocks_path or None,
            parse_task_list(args.tasks),
            args.split,
            args.n_samples,
            args.seed,
            parse_blocks(args.blocks),
            units,
            sample=args.sample,
        )
    try:
        run = client.get_run(args.run_id)
    except MlflowException:
        raise SearchError(f"run {args.run_id!r} not found in tracking store {client.tracking_uri!r}") from None
    kind, p = run.data.tags.get(names.KIND, ""), run.data.params
    revision = p.get("model_revision") if p.get("model_revision") not in (None, "", "local") else None
    common = dict(
        model=p.get("model", ""),
        revision=revision,
        blocks_path=p.get("model_blocks_path") or None,
        split=p.get("split", "validation"),
        n_samples=int(p.get("n_samples", 0)),
        seed=int(p.get("seed", 0)),
        kind=kind,
        run_id=args.run_id,
        sample=p.get("sample", "seeded"),
    )
    if kind == names.BEAM_SEARCH:
        try:
            results = BeamResults.from_json(tracking.load_json(client, args.run_id, names.BEAM_RESULTS))
        except Exception:
            raise SearchError(f"beam search run {args.run_id} has no readable {names.BEAM_RESULTS} (did it finish?)") from None
        found = {e.num_removed: e for e in results.recommendations}
        k = args.num_removed or max(found, default=0)
        if k not in found:
            allowed = f"1..{max(found)}" if found else "none, it recorded no recommendation"
            raise SearchError(f"num_removed {k} was not searched by beam search run {args.run_id}; allowed: {allowed}")
        return Source(**common, tasks=results.tasks, units=found[k].units, reference_run_id=found[k].run_id)
    if kind == names.PRUNE:
        tasks = parse_task_list(p["tasks"])
        tasks += [p["ppl_task"]] if p.get("ppl_task") and p["ppl_task"] not in tasks else []
        return Source(**common, tasks=tasks, reference_run_id=args.run_id)
    raise SearchError(f"run {args.run_id} is a {kind or 'untagged'} run; allowed: a beam_search or prune run")


# --------------------------------------------------------------------------- export


def prompt_logits(loaded: LoadedModel) -> list[torch.Tensor]:
    """Logits of the model on PROMPTS, each prompt alone (no padding), on the CPU in float32."""
    out = []
    with torch.inference_mode():
        for text in PROMPTS:
            ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
            out.append(loaded.model(ids).logits.float().cpu())
    return out


def plain_width_config(pruned_dir: Path):
    """The plain config of a width-pruned model whose layers all kept the same heads and channels."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pruned_dir)
    shapes = getattr(config, "prunetrack_layers", None) or []
    if not shapes or any(s != shapes[0] for s in shapes):
        kept = sorted({(s["num_attention_heads"], s["intermediate_size"]) for s in shapes})
        raise SearchError(
            f"the width-pruned {config.model_type} model keeps different sizes per layer ((heads, channels): "
            f"{kept[:3]}{' ...' if len(kept) > 3 else ''}), which a plain {config.model_type} config cannot "
            "express; load its artifact pruned_model/ with pruning.taylor.load_pruned"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.update({**shapes[0], "head_dim": head_dim})
    del config.prunetrack_layers
    return config


def export_blocks(source: Source, args, directory: Path, speed: SpeedSettings) -> Exported:
    """Save the dense model without the source's blocks and units to `directory` (pruning.export_units); the
    in-place removal (pruning.families.units_removed) is the reference."""
    with progress.phase(f"loading model {source.model}"):
        dense = load_model(
            source.model, device=args.device, dtype=args.dtype, revision=source.revision, blocks_path=source.blocks_path
        )
    removed = check_blocks(source.removed, dense.num_blocks)
    if not (removed or source.units):
        raise SearchError(f"blocks is empty; allowed: one or more of 0..{dense.num_blocks - 1}")
    check_lengths(dense, speed)
    units = (*removed, *source.units)
    try:
        with units_removed(dense, units):
            reference = prompt_logits(dense)
        with progress.phase("writing model shards"):
            config = save_without_units(dense, units, directory)
    except UnitError as err:
        raise SearchError(str(err)) from None
    return finish(source, dense, directory, reference, config, args, speed)


def export_width(source: Source, args, client, directory: Path, speed: SpeedSettings) -> Exported:
    """Save a prune run's uniform `pruned_model/` with a plain config to `directory`; `load_pruned` is the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruning import taylor

    try:
        pruned_dir = Path(client.download_artifacts(source.run_id, "pruned_model", str(directory.parent)))
    except Exception:
        raise SearchError(f"prune run {source.run_id} has no artifact pruned_model/ (it ran with save_model=false)") from None
    config = plain_width_config(pruned_dir)
    dense = load_model(source.model, device=args.device, dtype=args.dtype, revision=source.revision)
    check_lengths(dense, speed)
    device, dtype = dense.device, next(dense.model.parameters()).dtype
    pruned = taylor.load_pruned(pruned_dir).to(device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    reference = prompt_logits(LoadedModel(pruned, tokenizer, "", "", "model.layers"))
    plain = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    plain.load_state_dict(pruned.state_dict())
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del pruned, plain
    return finish(source, dense, directory, reference, (), args, speed)


def finish(source: Source, dense: LoadedModel, directory: Path, reference, units: Config, args, speed: SpeedSettings) -> Exported:
    """Reload the exported directory with plain transformers (and its shipped code), check its logits, time it
    against the dense model, measure both KV caches."""
    with progress.phase("reloading the exported model with plain transformers"):
        loaded = load_model(str(directory), device=args.device, dtype=args.dtype, trust_remote_code=ships_code(directory))
    dtype = next(loaded.model.parameters()).dtype
    diff = max(float((a - b).abs().max()) for a, b in zip(prompt_logits(loaded), reference))
    if diff > TOLERANCE[dtype]:
        raise SearchError(
            f"the exported {loaded.model.config.model_type} model's logits differ from the project's pruned "
            f"model by {diff:.3g} (tolerance {TOLERANCE[dtype]:g}): "
            "this family cannot be exported as a plain config"
        )
    with progress.phase(f"timing dense and pruned ({speed.repeats} to {speed.max_repeats} alternating rounds)"):
        timings = measure(dense, loaded, speed)
    with progress.phase("measuring peak memory"):
        peaks = peak_memory([dense, loaded], speed, [(source.model, source.revision), (str(directory), None)])
    timings["dense"]["peak_memory_mb"], timings["pruned"]["peak_memory_mb"] = peaks
    for side, model in (("dense", dense), ("pruned", loaded)):
        timings[side][names.KV_CACHE_BYTES_PER_TOKEN] = kv_cache_bytes_per_token(model.model, _prompts(model, speed))
    return Exported(directory, loaded, removed_blocks(units), units, diff, timings)


# --------------------------------------------------------------------------- measurement


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


def _prompts(loaded: LoadedModel, speed: SpeedSettings) -> torch.Tensor:
    """`batch` x `prompt_len` random token ids, the same for every model of the same vocabulary."""
    vocab = loaded.model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (speed.batch, speed.prompt_len), generator=torch.Generator().manual_seed(0))
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
    ids = {name: _prompts(loaded, speed) for name, loaded in sides.items()}
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
            "prefill_tokens_per_s": speed.batch * speed.prompt_len / p,
            "decode_tokens_per_s": speed.batch * speed.new_tokens / d,
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
    code = "import sys; from search.export_model import _child_peak; print(_child_peak(*sys.argv[1:]))"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, source, dtype, revision or "", json.dumps(asdict(speed))],
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
    _generate(loaded.model, _prompts(loaded, speed), speed.new_tokens)
    weights = sum(t.numel() * t.element_size() for t in loaded.model.parameters())
    return (weights + torch.cuda.max_memory_allocated(loaded.device) - before) / 2**20


def _child_peak(source: str, dtype: str, revision: str, speed: str) -> float:
    """In a fresh process: load on the CPU, run one prefill + decode pass, return the peak RSS in MiB."""
    settings = SpeedSettings(**json.loads(speed))
    loaded = load_model(source, device="cpu", dtype=dtype, revision=revision or None, trust_remote_code=ships_code(source))
    _generate(loaded.model, _prompts(loaded, settings), settings.new_tokens)
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def speed_report(exported: Exported, speed: SpeedSettings) -> dict:
    """`speed.json`: the settings, the machine, both sides' measurements and the ratios."""
    import transformers

    device = exported.loaded.device
    dense, pruned = exported.speed["dense"], exported.speed["pruned"]
    return {
        "settings": {
            **asdict(speed),
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


def rescore(exported: Exported, source: Source, args) -> dict[str, float]:
    """`<metric>_<task>` of the exported model on the source's tasks and data."""
    tasks = [
        load_task(n, source.split, source.n_samples or None, source.seed, args.data_dir or None, source.sample)
        for n in source.tasks
    ]
    compiled = use_compile(args.compile, exported.loaded.device)
    evaluator = Evaluator(exported.loaded, tasks, args.batch_size, compile=compiled)
    with progress.Progress(f"re-scoring the exported model on {', '.join(source.tasks)}", evaluator.n_tokens, "token") as bar:
        scores = evaluator.evaluate((), bar)
    return {f"{m}_{s.task}": v for s in scores.values() for m, v in s.metrics.items()}


def rescored_with(source: Source) -> dict:
    """The data the exported model was re-scored on: the source run's tasks, split, n_samples, sample and seed."""
    return {
        "tasks": ",".join(source.tasks),
        "split": source.split,
        "n_samples": source.n_samples,
        "sample": source.sample,
        "seed": source.seed,
    }


def reference_diff(client, source: Source, metrics: dict[str, float]) -> float | None:
    """Largest difference between the re-scored metrics and the reference run's (relative above 1, e.g. perplexities)."""
    if not source.reference_run_id:
        return None
    logged = client.get_run(source.reference_run_id).data.metrics
    diffs = [abs(v - logged[k]) / max(1.0, abs(logged[k])) for k, v in metrics.items() if k in logged]
    return max(diffs, default=None)


# --------------------------------------------------------------------------- logging


def log_export(client, run_id: str, source: Source, exported: Exported, report: dict, metrics: dict, args) -> None:
    """Metrics, tags, `speed.json` and the MLflow model `model/` of the export run."""
    import mlflow
    import transformers

    dense, pruned = report["dense"], report["pruned"]
    values = {
        "n_params": pruned["n_params"],
        "n_params_dense": dense["n_params"],
        "weight_mb": pruned["weight_mb"],
        "weight_mb_dense": dense["weight_mb"],
        "prefill_tokens_per_s": pruned["prefill_tokens_per_s"],
        "prefill_tokens_per_s_dense": dense["prefill_tokens_per_s"],
        **{f"prefill_speedup{s}": report[f"prefill_speedup{s}"] for s in ("", "_low", "_high")},
        **{f"decode_speedup{s}": report[f"decode_speedup{s}"] for s in ("_low", "_high")},
        "speedup_bound": report["speedup_bound"],
        "speed_rounds": report["settings"]["rounds"],
        "decode_tokens_per_s": pruned["decode_tokens_per_s"],
        "decode_tokens_per_s_dense": dense["decode_tokens_per_s"],
        "decode_speedup": report["decode_speedup"],
        "decode_ms_per_token": pruned["decode_ms_per_token"],
        "decode_ms_per_token_dense": dense["decode_ms_per_token"],
        "export_max_logit_diff": exported.logit_diff,
        names.KV_CACHE_BYTES_PER_TOKEN: pruned[names.KV_CACHE_BYTES_PER_TOKEN],
        names.KV_CACHE_BYTES_PER_TOKEN_DENSE: dense[names.KV_CACHE_BYTES_PER_TOKEN],
        **metrics,
    }
    values.update(peak_memory_mb=pruned["peak_memory_mb"], peak_memory_mb_dense=dense["peak_memory_mb"])
    diff = reference_diff(client, source, metrics)
    if diff is not None:
        values["rescore_max_diff"] = diff
    tracking.log(
        client,
        run_id,
        metrics=values,
        tags={
            "removed_blocks": ",".join(map(str, exported.removed)),
            names.REMOVED_UNITS: label(exported.units),
            "source_run_id": source.run_id,
            "source_kind": source.kind,
            "reference_run_id": source.reference_run_id,
        },
    )
    tracking.log_json(client, run_id, "speed.json", report)
    tracking.describe(client, run_id, summaries.export_description(source, exported.what, report, metrics))
    with progress.phase("saving and logging the MLflow model"), tempfile.TemporaryDirectory() as tmp:
        pip = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
        mlflow.transformers.save_model(
            {"model": exported.loaded.model, "tokenizer": exported.loaded.tokenizer},
            f"{tmp}/model",
            task="text-generation",
            pip_requirements=pip,
        )
        client.log_artifacts(run_id, f"{tmp}/model", "model")


def register(client, run_id: str, name: str, source: Source, exported: Exported) -> str:
    """Register `runs:/<run_id>/model` as a new version of `name`; returns the version."""
    import mlflow

    blocks, units = ",".join(map(str, exported.removed)), label(exported.units)
    tags = {"source_run_id": source.run_id, "removed_blocks": blocks, "export_run_id": run_id, "source_kind": source.kind}
    tags[names.REMOVED_UNITS] = units
    version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=tags).version
    origin = f"{source.kind} run {source.run_id}" if source.run_id else "an explicit unit list"
    client.update_model_version(name, version, f"{source.model} with {exported.what}, from {origin}; export run {run_id}.")
    return version


def main(argv=None) -> None:
    """Export a pruned model: `python -m search.export_model ...` or `mlflow run . -e export_model`."""
    args = parser().parse_args(argv)
    settings = cli.settings_from(ExportModelSettings, args)
    speed = SpeedSettings(settings.speed_batch, settings.prompt_len, settings.new_tokens, settings.repeats, settings.max_repeats)
    speed.check()
    client = tracking.connect(args.tracking_uri or None)
    source = source_of(client, settings)
    for name in source.tasks:  # unknown tasks and data fail before any model loads
        load_task(name, source.split, source.n_samples or None, source.seed, settings.data_dir or None, source.sample)
    launcher = os.environ.get("MLFLOW_RUN_ID")  # the run exists from the start only under `mlflow run`
    if settings.system_metrics and not launcher:
        logger.warning("system_metrics: the export run is created after the measurements; start it with mlflow run to log them")
    monitored = monitoring.system_metrics(client, launcher, settings.system_metrics, settings.device) if launcher else None
    with monitored or contextlib.nullcontext(), tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "hf"
        if source.kind == names.PRUNE:
            exported = export_width(source, settings, client, directory, speed)
        else:
            exported = export_blocks(source, settings, directory, speed)
        metrics = rescore(exported, source, settings)
        report = speed_report(exported, speed)
        for warning in report["warnings"]:
            logger.warning(warning)
        params = {
            "model": source.model,
            "num_removed": len(exported.units),
            "dtype": report["dtype"],
            "device": report["device"],
            "tasks": ",".join(source.tasks),
            "split": source.split,
            "n_samples": source.n_samples,
            "seed": source.seed,
            "batch_size": settings.batch_size,
            "torch_threads": report["torch_threads"],
            "register_as": settings.register_as,
            **{f"rescore_{k}": v for k, v in rescored_with(source).items()},
            **{f"speed_{k}" if k == "batch" else k: v for k, v in asdict(speed).items()},
        }
        with tracking.study_run(client, names.EXPORT, f"{names.EXPORT}/{source.model}", params) as (run_id, _):
            log_export(client, run_id, source, exported, report, metrics, settings)
            version = register(client, run_id, settings.register_as, source, exported) if settings.register_as else None
        if settings.output_dir:
            shutil.copytree(directory, settings.output_dir, dirs_exist_ok=True)
            cli.ignore_in_checkout(settings.output_dir)
    print(
        f"exported {source.model}, {exported.what}: {report['pruned']['n_params']:,} of "
        f"{report['dense']['n_params']:,} parameters; prefill {report['prefill_speedup']:.2f}x, decode "
        f"{report['decode_speedup']:.2f}x ({report['device']}, {report['dtype']}, batch {speed.batch}, "
        f"{speed.prompt_len}+{speed.new_tokens} tokens, {report['settings']['rounds']} rounds; 95% intervals "
        f"{report['prefill_speedup_low']:.2f}-{report['prefill_speedup_high']:.2f}x and "
        f"{report['decode_speedup_low']:.2f}-{report['decode_speedup_high']:.2f}x)"
    )
    print(json.dumps(metrics, indent=1))
    print(f"run: {run_id}" + (f"\nregistered: {settings.register_as} version {version}" if version else ""))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
