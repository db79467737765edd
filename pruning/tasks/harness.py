"""lm-evaluation-harness tasks, from the hub or from local JSONL files in the hub's field layout.

The prompts, choices and targets are lm-eval's own: each document goes through the task's
`process_docs`, `fewshot_context` (zero-shot) and `construct_requests`, so the (context,
continuation) pairs are exactly the ones lm-eval's `simple_evaluate` scores.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from pruning.tasks import Document, MultipleChoice, Task, TaskError, count_bytes, count_words

# Local folder names that differ from the lm-eval task name.
LOCAL_NAMES = {"wikitext": "wikitext2"}
# The metric papers report per task, as LLM-Pruner's tables do (acc_norm where lm-eval's leaderboards
# and LLM-Pruner use it); other multiple-choice tasks: acc; rolling-perplexity tasks: word_perplexity.
HEADLINE = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
# How lm-eval aggregates a rolling task's (loglikelihood, count) pairs: the ones task_score computes.
ROLLING_AGGREGATIONS = {
    "word_perplexity": "weighted_perplexity",
    "byte_perplexity": "weighted_perplexity",
    "bits_per_byte": "bits_per_byte",
}
DATA_DIR_ENV = "PRUNETRACK_DATA_DIR"


@lru_cache(maxsize=1)
def _task_manager():
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager()


def local_file(name: str, split: str, data_dir: str | None) -> Path | None:
    """`<data_dir>/<name>/<split>.jsonl` if it exists (data_dir defaults to $PRUNETRACK_DATA_DIR)."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        return None
    path = Path(data_dir) / LOCAL_NAMES.get(name, name) / f"{split}.jsonl"
    return path if path.is_file() else None


def jsonl_records(path: Path) -> list[tuple[int, dict]]:
    """The records of a local JSONL copy with their line numbers; a file lm-eval would fail on with a library
    traceback (not UTF-8, a line that is not a JSON object) is rejected in one line. Blank lines are skipped,
    as the JSON loader does."""
    records = []
    try:
        with path.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise TaskError(
                        f"{path}:{line_no}: not a JSON record ({err.msg} at column {err.colno}); "
                        "allowed: one JSON object per line"
                    ) from None
                if not isinstance(record, dict):
                    raise TaskError(
                        f"{path}:{line_no}: a JSON {type(record).__name__}, not a record; allowed: one JSON object per line"
                    ) from None
                records.append((line_no, record))
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); allowed: JSON lines in UTF-8") from None
    except OSError as err:
        raise TaskError(f"cannot read {path}: {err.strerror or err}") from None
    return records


def check_jsonl(path: Path) -> None:
    """Reject a local copy that lm-eval would fail on: unreadable (jsonl_records) or empty."""
    if not jsonl_records(path):
        raise TaskError(f"{path} is empty; allowed: one JSON record per line (or remove it to use the hub's copy)")


def build_lm_eval_task(name: str, split: str, data_dir: str | None = None):
    """The lm-eval Task object for `name`, reading `split` from a local JSONL file when one exists.

    Returns (task, docs) where docs are the documents of `split` after lm-eval's processing.
    """
    path = local_file(name, split, data_dir)
    if path is not None:
        check_jsonl(path)
    manager = _task_manager()
    entry = manager.task_index.get(name)
    if entry is None or entry.kind.name not in ("TASK", "PY_TASK"):
        raise TaskError(f"unknown task {name!r}; allowed: pydoc_ppl, pydoc_cloze, zero_shot_7, or an lm-eval task name")
    overrides = None
    if path is not None:
        overrides = {
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(path)}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            "fewshot_split": None,
        }
    try:
        # lm-eval's public TaskManager.load({"task": name, ...}) builds a task from the dict alone, without
        # the registered task's YAML (prompts, metrics); only the factory applies overrides on top of it.
        task = manager._factory.build(entry, overrides=overrides, registry=manager.task_index)
    except Exception as err:  # datasets raises many kinds when the hub is unreachable
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        if path is not None:  # the file is there and well-formed JSON: its fields do not fit the task
            raise TaskError(
                f"cannot load task {name!r} from {path}: {reason}; allowed: one JSON record per line with the hub's fields"
            ) from None
        hint = f"; put {split}.jsonl under <data_dir>/{LOCAL_NAMES.get(name, name)}/ or set {DATA_DIR_ENV}"
        raise TaskError(f"cannot load task {name!r} ({split}): {reason}{hint}") from None
    if path is not None or split == "validation":
        has_eval = task.has_test_docs() or task.has_validation_docs()
        docs = list(task.eval_docs) if has_eval else []
    else:
        docs = list(task.training_docs()) if task.has_training_docs() else []
    return task, docs


def _gold_index(task, doc, choices: list[str]) -> int:
    """The correct choice, resolved exactly as lm-eval's process_results does."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -1
    if isinstance(gold, list) or not 0 <= gold < len(choices):
        raise TaskError(f"task {task.config.task!r}: unsupported gold label {gold!r}")
    return gold


def load(name: str, split: str, data_dir: str | None = None) -> Task:
    """Convert an lm-eval task's documents into prunetrack examples."""
    task, docs = build_lm_eval_task(name, split, data_dir)
    path = local_file(name, split, data_dir)
    source = f"jsonl:{path}" if path else "lm_eval"
    if task.OUTPUT_TYPE == "loglikelihood_rolling":
        _check_rolling(task)
        examples = [_document(task, i, doc) for i, doc in enumerate(docs)]
        return Task(name, split, "perplexity", examples, source=source, headline=HEADLINE.get(name, "word_perplexity"))
    if task.OUTPUT_TYPE != "multiple_choice":
        raise TaskError(f"task {name!r} is {task.OUTPUT_TYPE}; allowed: multiple_choice or loglikelihood_rolling tasks")
    examples = []
    for i, doc in enumerate(docs):
        context = task.fewshot_context(doc, num_fewshot=0)
        requests = task.construct_requests(doc=doc, ctx=context, metadata=(name, i, 1))
        choices = task.doc_to_choice(doc)
        examples.append(
            MultipleChoice(
                doc_id=i,
                requests=tuple(tuple(r.arguments) for r in requests),
                gold=_gold_index(task, doc, choices),
                choice_lengths=tuple(float(len(c)) for c in choices),
            )
        )
    defined = _metric_names(task)
    metrics = ("acc",) + (("acc_norm",) if "acc_norm" in defined else ())  # acc always: drops use it
    headline = HEADLINE.get(name, "acc")
    return Task(
        name,
        split,
        "multiple_choice",
        examples,
        source=source,
        metrics=metrics,
        headline=headline if headline in metrics else "acc",
    )


def _metric_names(task) -> list[str]:
    """The metrics lm-eval reports for `task` (its metric_list)."""
    return list(getattr(task, "_metric_fn_list", None) or task.aggregation())


def _check_rolling(task) -> None:
    """Refuse a rolling task whose metrics lm-eval aggregates otherwise than task_score does."""
    aggregations = task.aggregation()
    for metric in _metric_names(task):
        fn = aggregations.get(metric)
        name = getattr(fn, "__name__", str(fn))
        if ROLLING_AGGREGATIONS.get(metric) != name:
            raise TaskError(
                f"task {task.config.task!r}: metric {metric!r} aggregated by {name!r}; allowed: "
                + ", ".join(f"{m} by {a}" for m, a in ROLLING_AGGREGATIONS.items())
            )


def _document(task, doc_id: int, doc) -> Document:
    """A rolling task's document: the text lm-eval scores, and the word and byte counts its own
    `process_results` divides by (WikiText counts them on the original page, not the scored text)."""
    text = task.doc_to_target(doc)
    counts = task.process_results(doc, [0.0])
    words = counts.get("word_perplexity", (0.0, count_words(text)))[1]
    n_bytes = counts.get("byte_perplexity", counts.get("bits_per_byte", (0.0, count_bytes(text))))[1]
    return Document(doc_id, text, int(words), int(n_bytes))
