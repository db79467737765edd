"""A configuration's drop: how much worse it is than the unpruned model on a task. The one
definition that ranking and importance (search), racing's per-example terms (pruning.racing) and
the bootstrapped importance of the consistency report (analysis) share.

Accuracy-type tasks drop by the score lost: accuracy for multiple choice (`acc`), the task score
for generation (`score`). Perplexity tasks drop by the increase in log-perplexity, with
log ppl = sum of the documents' NLL / sum of their scored tokens. Importance of a unit is the drop
of removing it alone. numpy only: analysis imports it without torch.
"""

from __future__ import annotations

import math

import numpy as np

PERPLEXITY = "perplexity"
RACING_ALPHA = 0.05  # racing's default error level per step (pruning.racing); here, torch-free, for the settings
SCORE_OF_KIND = {"multiple_choice": "acc", "generation": "score"}


def drop(task, baseline: dict[str, float], value: dict[str, float]) -> float:
    """The drop of a configuration (`value`: its metrics on `task`, a pruning.tasks.Task) from `baseline`."""
    if task.kind == PERPLEXITY:
        return math.log(value["ppl"]) - math.log(baseline["ppl"])
    key = SCORE_OF_KIND[task.kind]
    return baseline[key] - value[key]


def example_terms(kind: str, values: np.ndarray, tokens: np.ndarray | None = None) -> np.ndarray:
    """Each example's term of the drop up to the baseline's (which cancels in a difference of two
    configurations): minus its score (accuracy-type; `values` are 0/1 or scores), or its NLL scaled
    so that the terms of all documents average to log-perplexity (n_docs * nll / all scored tokens)."""
    values = np.asarray(values, float)
    if kind != PERPLEXITY:
        return -values
    return values * len(tokens) / np.sum(tokens)


def importances(values: np.ndarray, tokens: np.ndarray | None, weights: np.ndarray) -> np.ndarray:
    """Importance vectors from per-example results (row 0 the baseline, row i+1 without unit i),
    one vector per row of example `weights` (bootstrap resamples): baseline score - score without
    unit i, or log(ppl without i) - log(baseline ppl); `tokens` is None for accuracy-type tasks."""
    if tokens is None:
        score = weights @ values.T / weights.sum(axis=1, keepdims=True)
        return score[:, :1] - score[:, 1:]
    log_ppl = (weights @ values.T) / (weights @ tokens.T)
    return log_ppl[:, 1:] - log_ppl[:, :1]
