"""Evaluation sets: builtin offline tasks, lm-eval-harness tasks, and their local JSONL copies.

Every task becomes a list of model-independent examples:
- `MultipleChoice`: one (context, continuation) request per choice, scored by log-likelihood;
- `Document`: a text whose perplexity is measured.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SPLITS = ("train", "validation")


class TaskError(ValueError):
    """A task, split or sample size the user asked for cannot be used."""


@dataclass(frozen=True)
class MultipleChoice:
    """A multiple-choice item; `choice_lengths` are the character lengths acc_norm divides by."""

    doc_id: int
    requests: tuple[tuple[str, str], ...]
    gold: int
    choice_lengths: tuple[float, ...]


@dataclass(frozen=True)
class Document:
    """A text scored by rolling log-likelihood (perplexity)."""

    doc_id: int
    text: str


@dataclass
class Task:
    """A named, sampled evaluation set."""

    name: str
    split: str
    kind: str  # "multiple_choice", "perplexity" or "generation"
    examples: list = field(repr=False)
    source: str = "builtin"
    task_type: str | None = None


def sample(examples: list, n_samples: int | None, seed: int) -> list:
    """A seeded subset of `n_samples` examples, kept in their original order."""
    if not n_samples or n_samples >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n_samples))
    return [examples[i] for i in keep]


def load_task(
    name: str,
    split: str = "validation",
    n_samples: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
) -> Task:
    """Load task `name` on `split`, sampling `n_samples` examples with `seed`.

    Names: the builtin `pydoc_ppl` and `pydoc_cloze`, or any lm-eval-harness
    multiple-choice or perplexity task, or a VQA task (`pruning.tasks.vqa.TASKS`); with
    `data_dir`, `<data_dir>/<name>/<split>.jsonl` replaces the hub download.
    """
    from pruning.tasks import builtin, harness, vqa

    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if n_samples is not None and n_samples < 1:
        raise TaskError(f"n_samples must be at least 1, got {n_samples}")
    if name in builtin.TASKS:
        task = builtin.load(name, split)
    elif vqa.is_vqa(name, split, data_dir):
        task = vqa.load(name, split, data_dir)
    else:
        task = harness.load(name, split, data_dir)
    if not task.examples:
        raise TaskError(f"task {name!r} has an empty {split} split")
    task.examples = sample(task.examples, n_samples, seed)
    return task


def parse_task_list(tasks: str | list[str]) -> list[str]:
    """Split a comma-separated task list, expanding suite names such as `zero_shot_7`."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    expanded: list[str] = []
    for name in filter(None, names):
        for task in SUITES.get(name, (name,)):
            if task not in expanded:
                expanded.append(task)
    if not expanded:
        raise TaskError("no task given; e.g. tasks=pydoc_ppl,pydoc_cloze")
    return expanded


SUITES = {
    "zero_shot_7": ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"),
}
