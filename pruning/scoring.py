"""What the search asks of an evaluator, whichever way it scores: pruning.evaluate.Evaluator
(log-likelihoods, step-wide over packed rows) and pruning.vlm.GenerationEvaluator (VQA, by
generation) both provide it, so the search never tells them apart by type."""

from __future__ import annotations

from typing import Protocol

from pruning.tasks import Task


class ConfigEvaluator(Protocol):
    """Scores configurations of removed units on a fixed set of tasks and examples."""

    loaded: object  # pruning.models.LoadedModel
    tasks: list[Task]
    batch_size: int
    races: bool  # whether evaluate_many takes a pruning.racing.Race and stops configurations early

    def evaluate_many(self, configs, progress=None, race=None) -> dict:
        """Each configuration's ConfigScores, keyed as given."""

    def with_batch_size(self, batch_size: int) -> ConfigEvaluator:
        """The same evaluator (model, tasks, examples, options) scoring `batch_size` rows at a time."""
