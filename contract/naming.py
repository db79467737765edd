"""Run names people can read: a study run's kind, model, tasks, sample size and key settings; a
model's short label; and telling MLflow's made-up names from the user's own. No MLflow at import."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from contract import names

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


# The default model's name (pruning.models.DEFAULT_MODEL; not imported: analysis never loads torch).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The settings a study's run name shows after model, tasks and sample size, per kind: (param, label).
NAME_SETTINGS = {
    names.BEAM_SEARCH: (("beam_width", "width"), ("max_removed", "max_removed")),
    names.PRUNE: (("pruning_ratio", "ratio"),),
    names.EXPORT: (("num_removed", "removed"), ("dest", "")),
    names.CORRELATION: (("study_name", ""), ("target", "")),
    names.BEAM_SUMMARY: (("beam_search_run_id", "of"),),
    names.STUDY: (("study_name", ""),),
    names.STUDY_WORKER: (("study_name", ""),),
}
_NAME_LIMIT = 250


def model_label(model: str) -> str:
    """A model as a run name shows it: `default` is the default model's name; a hub id, folder or
    .gguf file its last part (`HuggingFaceTB/SmolLM2-1.7B` -> `SmolLM2-1.7B`)."""
    model = str(model).strip().rstrip("/")
    if model in ("", "default"):
        return DEFAULT_MODEL_NAME if model else ""
    return re.sub(r"\.gguf$", "", model.replace("\\", "/").rsplit("/", 1)[-1])


def run_name(kind: str, params: dict) -> str:
    """A study run's name: its kind, model, tasks, sample size, split (when not validation) and the
    key settings of its kind, e.g. `sensitivity SmolLM2-135M-Instruct piqa,arc_easy n=100`."""
    parts = [kind]
    if str(params.get("model", "")).strip():
        parts.append(model_label(params["model"]))
    tasks = str(params.get("tasks", "")).strip()
    if tasks:
        parts.append(tasks if len(tasks) <= 80 else tasks[:77] + "...")
    n = str(params.get("n_samples", "")).strip()
    if n:
        parts.append("n=all" if n == "0" else f"n={n}")
    split = str(params.get("split", "")).strip()
    if split and split != "validation":
        parts.append(split)
    for key, label in NAME_SETTINGS.get(kind, ()):
        value = str(params.get(key, "")).strip()
        if value:
            parts.append(f"{label}={value}" if label else value)
    return " ".join(parts)[:_NAME_LIMIT]


def name_run(client: MlflowClient, run_id: str, name: str, current: str | None = None) -> None:
    """Give run `run_id` (one `mlflow run` created) the name `name`, unless it has one the user gave
    (`mlflow run --run-name`); MLflow's made-up names (`bemused-fox-123`) are replaced."""
    if current is None:
        current = client.get_run(run_id).info.run_name
    if _generated_name(current):
        client.update_run(run_id, name=name)


def _generated_name(name: str | None) -> bool:
    """Whether a run name is one MLflow made up (`bemused-fox-123`), not one the user gave."""
    if not name:
        return True
    match = re.fullmatch(r"([a-z]+)-([a-z]+)-(\d+)", name)
    if not match:
        return False
    try:
        from mlflow.utils import name_utils

        predicates = {w.lower() for w in name_utils._GENERATOR_PREDICATES}
        nouns = {w.lower() for w in name_utils._GENERATOR_NOUNS}
    except (ImportError, AttributeError):  # MLflow moved its word lists: the pattern alone decides
        return True
    return match.group(1) in predicates and match.group(2) in nouns
