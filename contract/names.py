"""The names of the tracking contract: run kinds, tag keys, metric names and artifact files.

search/ writes runs with these names and analysis/ reads them back; nothing else spells them.
docs/contract.md documents each one (tests/test_contract.py checks both ways).
"""

from __future__ import annotations

# Tag naming a run's kind, and its values.
KIND = "prunetrack.kind"
SENSITIVITY = "sensitivity"  # a sensitivity study's parent run
CONFIG = "config"  # one configuration (removed blocks or sublayers) evaluated: a child run
BEAM_SEARCH = "beam_search"  # a beam search worker's parent run
PRUNE = "prune"  # a width pruning, also each trial of a Taylor study
STUDY = "study"  # a Taylor study's parent run
STUDY_WORKER = "study_worker"  # a worker of a Taylor study
EXPORT = "export"  # a pruned model exported (search.export_model) or results pushed to S3 (analysis.export)
CONSISTENCY, CORRELATION, BEAM_SUMMARY = "consistency", "correlation", "beam_summary"  # analysis runs
METHOD_SELECTION = "method_selection"  # pruning methods' selections on one split, scored on another (search.compare)
COMPARE_METHODS = "compare_methods"  # the analysis of a method selection (analysis.compare_methods)

# Tags every run of a study carries, and on failure.
HOST, PID = "prunetrack.host", "prunetrack.pid"  # the process that owns a RUNNING run
ERROR = "prunetrack.error"  # why a run FAILED or was KILLED, one line
DESCRIPTION = "mlflow.note.content"  # a study run's Markdown summary, shown atop its page in the MLflow UI
REUSED_ALL = "prunetrack.reused_all"  # a study start that scored nothing: every configuration came from the store

# Tags of configuration runs.
CONFIG_HASH = "config_hash"
REMOVED_BLOCKS = "removed_blocks"  # the whole blocks removed, comma-separated, sorted; empty for the baseline
REMOVED_UNITS = "removed_units"  # every unit removed, e.g. a4,m13,b20 (pruning.units.label); empty for the baseline
NUM_REMOVED = "num_removed"
STOPPED, STOPPED_REASON = "prunetrack.stopped", "prunetrack.stopped_reason"  # a candidate racing stopped


def headline_tag(task: str) -> str:
    """Tag of configuration and prune runs: the metric papers report for `task` (acc, acc_norm, ...)."""
    return f"headline/{task}"


# Tags of study parent runs.
MOST_IMPORTANT, LEAST_IMPORTANT = "most_important_blocks", "least_important_blocks"  # sensitivity
BEAM_KEY = "beam_key"  # one beam search, whatever worker or rerun
FAILED_CONFIGS = "prunetrack.failed_configs"
BEST_TRIAL = "best_trial"  # Taylor study
STUDY_NAME, TRIAL_NUMBER, STORAGE = "optuna.study_name", "optuna.trial_number", "optuna.storage"  # Taylor study and trials


def recommended_tag(k: int) -> str:
    """Tag of a beam search run: the recommended removed blocks for `k` removed."""
    return f"recommended/{k}"


def task_type_tag(task: str) -> str:
    """Tag of a beam search run: the type (e.g. reasoning, knowledge) of `task`, where tasks carry one."""
    return f"task_type/{task}"


def metric(name: str, task: str) -> str:
    """A per-task metric: `acc_piqa`, `word_perplexity_wikitext`, `n_piqa`."""
    return f"{name}_{task}"


def importance(task: str) -> str:
    """Metric of a sensitivity parent run: the importance of each block on `task` (step = block)."""
    return f"importance/{task}"


def baseline_metric(metric_name: str) -> str:
    """The unpruned model's value of a metric, logged on study parents: `baseline_acc_piqa`."""
    return f"baseline_{metric_name}"


def importance_attn(task: str) -> str:
    """Metric of a sublayer sensitivity parent run: the importance of each block's attention on `task` (step = block)."""
    return f"importance_attn/{task}"


def importance_mlp(task: str) -> str:
    """Metric of a sublayer sensitivity parent run: the importance of each block's MLP on `task` (step = block)."""
    return f"importance_mlp/{task}"


# Metrics of export runs: what the KV cache holds per token after a prefill, pruned and dense model.
KV_CACHE_BYTES_PER_TOKEN, KV_CACHE_BYTES_PER_TOKEN_DENSE = "kv_cache_bytes_per_token", "kv_cache_bytes_per_token_dense"


# Artifacts.
SENSITIVITY_REPORT, IMPORTANCE_PLOT = "sensitivity.json", "importance.png"
SUBLAYER_IMPORTANCE_PLOT = "sublayer_importance.png"  # sensitivity with removal_unit=sublayer
BEAM_RESULTS, BEAM_TABLE, BEAM_DROPS_PLOT = "beam_search_results.json", "recommendations.md", "beam_drops.png"
STUDY_RESULTS = "search_results.csv"
PRUNE_REPORT = "prune_report.json"
METHOD_SELECTION_REPORT = "method_selection.json"
COMPARE_JSON, COMPARE_TABLE, COMPARE_PLOT = "compare_methods.json", "compare_methods.tex", "compare_methods.png"


def criterion_metric(criterion: str, kind: str = "b") -> str:
    """The per-unit metric of an importance criterion (step = block index): `criterion/<name>` for
    blocks, `criterion/<name>_attn` and `criterion/<name>_mlp` for attention and MLP sublayers."""
    return f"criterion/{criterion}" + {"b": "", "a": "_attn", "m": "_mlp"}[kind]


def beam_step(k: int) -> str:
    """The artifact of beam search step `k`: every candidate and the kept beams."""
    return f"beam_step{k}.json"


def per_example(task: str) -> str:
    """The artifact of a configuration or prune run with the per-example results of `task`."""
    return f"per_example/{task}.json"
