"""Task metrics from request log-likelihoods, as lm-eval defines and aggregates them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pruning.tasks import Task


@dataclass
class TaskScore:
    """Aggregate metrics and the per-example results behind them."""

    task: str
    kind: str
    metrics: dict[str, float]
    per_example: dict[str, list] = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.per_example["doc_id"])


def task_score(task: Task, examples: list[int], lls: list[np.ndarray], tokens: list[int]) -> TaskScore:
    """Metrics of `task` over its examples `examples` (indices, in task order), from each one's
    request log-likelihoods `lls` and scored tokens `tokens`.

    Multiple choice: `acc` (argmax of the summed log-likelihood) and, where the task defines it
    (`task.metrics`), `acc_norm` (argmax of the log-likelihood over the choice's character length).
    Perplexity, as lm-eval aggregates a rolling task: `word_perplexity` = exp(NLL / words),
    `byte_perplexity` = exp(NLL / bytes), `bits_per_byte` = NLL / bytes / ln 2, with the words and
    bytes of each document counted as the task's lm-eval definition counts them (`Document.words`,
    `.bytes`); and `ppl` = exp(NLL / scored tokens), which depends on the tokenizer and the rolling
    window length. NLL and counts are summed over the documents before dividing.
    """
    chosen = [task.examples[i] for i in examples]
    doc_ids = [ex.doc_id for ex in chosen]
    if task.kind == "multiple_choice":
        correct = [int(np.argmax(ll) == ex.gold) for ll, ex in zip(lls, chosen)]
        per_example = {"doc_id": doc_ids, "acc": correct}
        metrics = {"acc": float(np.mean(correct))}
        if "acc_norm" in task.metrics:
            correct_norm = [int(np.argmax(ll / np.array(ex.choice_lengths)) == ex.gold) for ll, ex in zip(lls, chosen)]
            per_example["acc_norm"] = correct_norm
            metrics["acc_norm"] = float(np.mean(correct_norm))
        per_example["loglikelihoods"] = [ll.tolist() for ll in lls]
        return TaskScore(task.name, task.kind, metrics, per_example)
    nll = [float(-ll.sum()) for ll in lls]
    words = [ex.words for ex in chosen]
    n_bytes = [ex.bytes for ex in chosen]
    total = sum(nll)
    metrics = {
        "ppl": math.exp(total / sum(tokens)),
        "word_perplexity": math.exp(total / sum(words)),
        "byte_perplexity": math.exp(total / sum(n_bytes)),
        "bits_per_byte": total / sum(n_bytes) / math.log(2),
    }
    per_example = {"doc_id": doc_ids, "nll": nll, "tokens": list(tokens), "words": words, "bytes": n_bytes}
    return TaskScore(task.name, task.kind, metrics, per_example)
