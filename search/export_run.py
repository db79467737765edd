"""The export run's metrics, tags, `speed.json` and MLflow model `model/`, and its registration."""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

import torch

from contract import names, tracking
from pruning.units import label
from search import progress, summaries

if TYPE_CHECKING:
    from search.export_model import Exported
    from search.export_source import Source


def reference_diff(client, source: Source, metrics: dict[str, float]) -> float | None:
    """Largest difference between the re-scored metrics and the reference run's (relative above 1, e.g. perplexities)."""
    if not source.reference_run_id:
        return None
    logged = client.get_run(source.reference_run_id).data.metrics
    diffs = [abs(v - logged[k]) / max(1.0, abs(logged[k])) for k, v in metrics.items() if k in logged]
    return max(diffs, default=None)


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
            names.REMOVED_BLOCKS: ",".join(map(str, exported.removed)),
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
    tags = {"source_run_id": source.run_id, names.REMOVED_BLOCKS: blocks, "export_run_id": run_id, "source_kind": source.kind}
    tags[names.REMOVED_UNITS] = units
    version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=tags).version
    origin = f"{source.kind} run {source.run_id}" if source.run_id else "an explicit unit list"
    client.update_model_version(name, version, f"{source.model} with {exported.what}, from {origin}; export run {run_id}.")
    return version
