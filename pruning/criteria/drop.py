"""Criterion `drop`: the measured task-metric drop (pruning.drop.drop) of the configuration with the
unit removed, averaged over the selection tasks: prunetrack's own criterion. It measures, so it can
re-score after every removal (greedy, beam)."""

from __future__ import annotations

from pruning.criteria import CriterionError, Inputs
from pruning.units import Config, Unit, normalize


def score(inputs: Inputs, removed: Config, units: Config, n: int = 1) -> dict[Unit, float]:
    """The mean drop of `removed` plus each unit, measured on the selection data."""
    if inputs.measure is None:
        raise CriterionError("criterion drop needs selection data to measure configurations on; none given")
    return extended(inputs.measure, removed, units)


def extended(measure, removed: Config, units: Config) -> dict[Unit, float]:
    """`measure` of `removed` extended by each of `units` (shared by the measuring criteria)."""
    configs = {u: normalize((*removed, u)) for u in units if u not in removed}
    values = measure(list(configs.values()))
    return {u: values[c] for u, c in configs.items()}
