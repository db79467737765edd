"""Export a pruned model as a plain Hugging Face model and an MLflow model, measured against the dense one.

The source is a beam search run (its recommendation for `num_removed` units), a `prune` run (its
width-pruned `pruned_model/`, when every layer kept the same shape), or `model` with a `blocks` or `units`
list (search.export_source). Removed sublayers ship modeling code with the model (pruning.export_units).
Everything is computed before the run is created, so bad input or a model that cannot be exported
writes nothing: export (blocks physically removed, config consistent), reload the directory with
plain transformers and check its logits against the project's own pruned model, time dense and
pruned (search.export_timing), re-score the source's tasks on the exported model. Then one run
(`prunetrack.kind=export`) gets the metrics, `speed.json` and the MLflow model `model/`, optionally
registered (search.export_run).
"""

from __future__ import annotations

from contract import cli
from search.settings import ExportModelSettings
from search.settings import export_model_parser as parser

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load torch
    cli.check_args(parser)

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from contract import names, tracking
from pruning.compile import use_compile
from pruning.evaluate import Evaluator
from pruning.export_units import kv_cache_bytes_per_token, save_without_units, ships_code
from pruning.families import units_removed
from pruning.models import LoadedModel, check_blocks, load_model
from pruning.tasks import load_task
from pruning.units import Config, UnitError, is_blocks_only, label, removed_blocks
from search import monitoring, progress
from search.cli import SearchError, run_main
from search.export_run import log_export, register
from search.export_source import Source, source_of
from search.export_timing import check_lengths, measure, peak_memory, random_prompts, speed_report

logger = logging.getLogger(__spec__.name)  # `python -m search.export_model` runs it as __main__: log under its own name

PROMPTS = ("The quick brown fox jumps over the lazy dog.", "def main():\n    return 0", "In 1905, Albert Einstein")
# Largest |logit difference| between the exported model and the project's pruned model, by dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@dataclass
class Exported:
    """The checked, exported model in `directory`, and what was measured before the run is created."""

    directory: Path
    loaded: LoadedModel
    removed: tuple[int, ...]  # whole blocks
    units: Config  # every unit removed, blocks included
    logit_diff: float
    speed: dict  # dense and pruned measurements (search.export_timing.measure)

    @property
    def what(self) -> str:
        """`blocks [2,4] removed`, `units [a4,b20] removed` or `width-pruned`."""
        if not self.units:
            return "width-pruned"
        if is_blocks_only(self.units):
            return f"blocks [{','.join(map(str, self.removed))}] removed"
        return f"units [{label(self.units)}] removed"


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


def export_blocks(source: Source, args: ExportModelSettings, directory: Path) -> Exported:
    """Save the dense model without the source's blocks and units to `directory` (pruning.export_units); the
    in-place removal (pruning.families.units_removed) is the reference."""
    with progress.phase(f"loading model {source.model}"):
        dense = load_model(
            source.model, device=args.device, dtype=args.dtype, revision=source.revision, blocks_path=source.blocks_path
        )
    removed = check_blocks(source.removed, dense.num_blocks)
    if not (removed or source.units):
        raise SearchError(f"blocks is empty; allowed: one or more of 0..{dense.num_blocks - 1}")
    check_lengths(dense, args)
    units = (*removed, *source.units)
    try:
        with units_removed(dense, units):
            reference = prompt_logits(dense)
        with progress.phase("writing model shards"):
            config = save_without_units(dense, units, directory)
    except UnitError as err:
        raise SearchError(str(err)) from None
    return finish(source, dense, directory, reference, config, args)


def export_width(source: Source, args: ExportModelSettings, client, directory: Path) -> Exported:
    """Save a prune run's uniform `pruned_model/` with a plain config to `directory`; `load_pruned` is the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruning import taylor

    try:
        pruned_dir = Path(client.download_artifacts(source.run_id, "pruned_model", str(directory.parent)))
    except Exception:
        raise SearchError(f"prune run {source.run_id} has no artifact pruned_model/ (it ran with save_model=false)") from None
    config = plain_width_config(pruned_dir)
    dense = load_model(source.model, device=args.device, dtype=args.dtype, revision=source.revision)
    check_lengths(dense, args)
    device, dtype = dense.device, next(dense.model.parameters()).dtype
    pruned = taylor.load_pruned(pruned_dir).to(device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    reference = prompt_logits(LoadedModel(pruned, tokenizer, "", "", "model.layers"))
    plain = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    plain.load_state_dict(pruned.state_dict())
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del pruned, plain
    return finish(source, dense, directory, reference, (), args)


def finish(source: Source, dense: LoadedModel, directory: Path, reference, units: Config, args: ExportModelSettings) -> Exported:
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
    with progress.phase(f"timing dense and pruned ({args.repeats} to {args.max_repeats} alternating rounds)"):
        timings = measure(dense, loaded, args)
    with progress.phase("measuring peak memory"):
        peaks = peak_memory([dense, loaded], args, [(source.model, source.revision), (str(directory), None)])
    timings["dense"]["peak_memory_mb"], timings["pruned"]["peak_memory_mb"] = peaks
    for side, model in (("dense", dense), ("pruned", loaded)):
        timings[side][names.KV_CACHE_BYTES_PER_TOKEN] = kv_cache_bytes_per_token(model.model, random_prompts(model, args))
    return Exported(directory, loaded, removed_blocks(units), units, diff, timings)


# --------------------------------------------------------------------------- re-scoring


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


def main(argv=None) -> None:
    """Export a pruned model: `python -m search.export_model ...` or `mlflow run . -e export_model`."""
    args = parser().parse_args(argv)
    settings = cli.settings_from(ExportModelSettings, args)
    settings.check()
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
            exported = export_width(source, settings, client, directory)
        else:
            exported = export_blocks(source, settings, directory)
        metrics = rescore(exported, source, settings)
        report = speed_report(exported, settings)
        for warning in report["warnings"]:
            logger.warning(warning)
        params = {
            "model": source.model,
            names.NUM_REMOVED: len(exported.units),
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
            **settings.speed_settings(),
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
        f"{report['decode_speedup']:.2f}x ({report['device']}, {report['dtype']}, batch {settings.speed_batch}, "
        f"{settings.prompt_len}+{settings.new_tokens} tokens, {report['settings']['rounds']} rounds; 95% intervals "
        f"{report['prefill_speedup_low']:.2f}-{report['prefill_speedup_high']:.2f}x and "
        f"{report['decode_speedup_low']:.2f}-{report['decode_speedup_high']:.2f}x)"
    )
    print(json.dumps(metrics, indent=1))
    print(f"run: {run_id}" + (f"\nregistered: {settings.register_as} version {version}" if version else ""))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
