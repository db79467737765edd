"""Importance criteria: how a removal unit (pruning.units) is scored, one small module each.

Every criterion has one signature, `score(inputs: Inputs, removed: Config, units: Config, n: int = 1)
-> dict[Unit, float]`: the importance of removing each of `units` from the model with `removed`
already taken out; the procedures (search.procedures) remove the units that score lowest. `n` is the
number of units removed together, which only angular distance reads (Gromov et al. score a window
of n blocks). What each criterion reads, and what it costs in forward-pass equivalents over its data
(F: one forward pass of the unpruned model over that data), is in CRITERIA:

- `drop` (criteria.drop): the task-metric drop of the configuration with the unit removed, mean
  over the tasks, on the selection data (pruning.drop.drop); 1 F per unit scored (step-wide
  scoring shares the blocks below the first removed one, so less in practice);
- `ppl_drop` (criteria.ppl_drop): the increase of log-perplexity on calibration text (the perplexity
  tasks of the selection data), SLEB's criterion; 1 F of the calibration text per unit scored;
- `block_influence` (criteria.block_influence): ShortGPT's 1 - cos(block input, block output), averaged over
  tokens; 0 extra F (read from the baseline pass);
- `angular_distance` (criteria.angular_distance): Gromov et al.'s arccos(cos(x_l, x_{l+n}))/pi on each
  sequence's last token; 0 extra F;
- `taylor` (criteria.taylor): Shortened LLaMA's block-level first-order Taylor score on calibration
  text; 1 forward + 1 backward, about 3 F of the calibration text, once.

Higher scores mean more important everywhere (a unit whose removal hurts more, or that changes its
input more).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pruning.units import Config, Unit


class CriterionError(ValueError):
    """An unknown criterion, or one whose data is not available."""


@dataclass(frozen=True)
class Criterion:
    """What a criterion is: its name, whether it measures configurations (so it can re-score after
    each removal) or reads the unpruned model once, whether it needs calibration text, its cost."""

    name: str
    measures: bool
    needs_calibration: bool
    cost: str  # in forward-pass equivalents (F) over its data


CRITERIA = {
    c.name: c
    for c in (
        Criterion("drop", True, False, "1 F of the selection data per unit scored"),
        Criterion("ppl_drop", True, True, "1 F of the calibration text per unit scored"),
        Criterion("block_influence", False, False, "0 extra F: read from the baseline pass"),
        Criterion("angular_distance", False, False, "0 extra F: read from the baseline pass"),
        Criterion("taylor", False, True, "~3 F of the calibration text (1 forward + 1 backward), once"),
    )
}


def get(name: str) -> Criterion:
    """The criterion `name`, or a one-line error listing the allowed ones."""
    if name not in CRITERIA:
        raise CriterionError(f"unknown criterion {name!r}; allowed: {', '.join(CRITERIA)}")
    return CRITERIA[name]


@dataclass
class Inputs:
    """What the criteria read; each field is filled by the caller (search side) when available."""

    num_blocks: int
    measure: Callable[[list[Config]], dict[Config, float]] | None = None  # mean task drop of configurations
    measure_ppl: Callable[[list[Config]], dict[Config, float]] | None = None  # log-ppl increase on calibration text
    states: object | None = None  # criteria.states.BlockStates of the unpruned model
    taylor: dict[Unit, float] | None = None  # criteria.taylor.unit_scores of the unpruned model


def baseline_states(name: str, inputs: Inputs, removed: Config):
    """The unpruned model's block states for a static criterion `name`, or a one-line error when none
    were recorded or when it is asked to re-score after a removal (it reads the unpruned model only)."""
    if inputs.states is None:
        raise CriterionError(f"criterion {name} needs the block states of a baseline pass; none recorded")
    if removed:
        raise CriterionError(f"criterion {name} scores the unpruned model only; procedures allowed: one_shot, last_n")
    return inputs.states


def score(name: str, inputs: Inputs, removed: Config, units: Config, n: int = 1) -> dict[Unit, float]:
    """Criterion `name`'s score of each of `units`, with `removed` already removed."""
    import importlib

    return importlib.import_module(f"pruning.criteria.{get(name).name}").score(inputs, removed, units, n)
