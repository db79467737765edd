"""Evaluation sets: builtin offline tasks, lm-eval-harness tasks, and their local JSONL copies.

Every task becomes a list of model-independent examples:
- `MultipleChoice`: one (context, continuation) request per choice, scored by log-likelihood;
- `Document`: a text whose perplexity is measured.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

SPLITS = ("train", "validation")
SAMPLES = ("seeded", "first")  # how n_samples examples are taken: a seeded sample, or the first in file order
# Metrics a task reports, by kind, unless the task says otherwise (lm-eval's tasks do: BoolQ and
# WinoGrande define no acc_norm), and the headline metric (the one papers report) by kind.
METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "perplexity": ("ppl", "word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generation": ("score",),
}
HEADLINE = {"multiple_choice": "acc", "perplexity": "word_perplexity", "generation": "score"}


class TaskError(ValueError):
    """A task, split or sample size the user asked for cannot be used."""


@dataclass(frozen=True)
class MultipleChoice:
    """A multiple-choice item; `choice_lengths` are the character lengths acc_norm divides by."""

    doc_id: int
    requests: tuple[tuple[str, str], ...]
    gold: int
    choice_lengths: tuple[float, ...]


def count_words(text: str) -> int:
    """Words as lm-eval counts them for word_perplexity (its default `count_words`)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """UTF-8 bytes as lm-eval counts them for byte_perplexity and bits_per_byte."""
    return len(text.encode("utf-8"))


@dataclass(frozen=True)
class Document:
    """A text scored by rolling log-likelihood (perplexity).

    `text` is what the model scores (for WikiText, lm-eval's detokenized page); `words` and `bytes`
    are the counts word_perplexity, byte_perplexity and bits_per_byte divide by, as the task's
    lm-eval definition counts them (WikiText counts them on the original page, not on `text`).
    Left out, they are counted on `text`, lm-eval's default.
    """

    doc_id: int
    text: str
    words: int = -1
    bytes: int = -1

    def __post_init__(self):
        if self.words < 0:
            object.__setattr__(self, "words", count_words(self.text))
        if self.bytes < 0:
            object.__setattr__(self, "bytes", count_bytes(self.text))


@dataclass
class Task:
    """A named, sampled evaluation set."""

    name: str
    split: str
    kind: str  # "multiple_choice", "perplexity" or "generation"
    examples: list = field(repr=False)
    source: str = "builtin"
    task_type: str | None = None
    metrics: tuple[str, ...] = ()  # the metrics it reports; empty: METRICS[kind]
    headline: str = ""  # the metric papers report for it; empty: HEADLINE[kind]

    def __post_init__(self):
        self.metrics = tuple(self.metrics) or METRICS.get(self.kind, ())
        self.headline = self.headline or HEADLINE.get(self.kind, "")


def sample(examples: list, n_samples: int | None, seed: int, how: str = "seeded") -> list:
    """`n_samples` of the examples, kept in their original order: a seeded subset (`seeded`), or the
    first ones in file order (`first`, what other tools' `--limit N` takes)."""
    if how not in SAMPLES:
        raise TaskError(f"unknown sample {how!r}; allowed: {', '.join(SAMPLES)}")
    if not n_samples or n_samples >= len(examples):
        return list(examples)
    if how == "first":
        return list(examples[:n_samples])
    keep = sorted(random.Random(seed).sample(range(len(examples)), n_samples))
    return [examples[i] for i in keep]


def load_task(
    name: str,
    split: str = "validation",
    n_samples: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    sample_how: str = "seeded",
) -> Task:
    """Load task `name` on `split`, sampling `n_samples` examples with `seed` (`sample_how`
    `seeded`), or taking the first `n_samples` in file order (`first`).

    Names: the builtin `pydoc_ppl` and `pydoc_cloze`, or any lm-eval-harness
    multiple-choice or perplexity task, or a VQA task (`pruning.tasks.vqa.TASKS`); with
    `data_dir`, `<data_dir>/<name>/<split>.jsonl` replaces the hub download.
    """
    from pruning.tasks import builtin, harness, vqa

    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if n_samples is not None and n_samples < 1:
        raise TaskError(f"n_samples must be at least 1, got {n_samples}")
    if sample_how not in SAMPLES:
        raise TaskError(f"unknown sample {sample_how!r}; allowed: {', '.join(SAMPLES)}")
    if name in builtin.TASKS:
        task = builtin.load(name, split)
    elif vqa.is_vqa(name, split, data_dir):
        task = vqa.load(name, split, data_dir)
    else:
        task = harness.load(name, split, data_dir)
    if not task.examples:
        raise TaskError(f"task {name!r} has an empty {split} split")
    task.examples = sample(task.examples, n_samples, seed, sample_how)
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
