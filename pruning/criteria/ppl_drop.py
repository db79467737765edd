"""Criterion `ppl_drop`: the increase of log-perplexity on calibration text when the unit is removed,
SLEB's criterion (jiwonsong-dev/SLEB, sleb.py: at each phase every alive block is turned off in turn,
the summed NLL of the calibration windows is measured, and the block with the lowest NLL goes). Here
the calibration text is the perplexity tasks (e.g. WikiText-2) of the selection data, scored as
pruning.evaluate scores them (lm-eval's rolling windows); log-perplexity is NLL per token, so the
ranking is SLEB's. Shortened LLaMA's PPL criterion is the same score ranked once (one_shot)."""

from __future__ import annotations

from pruning.criteria import CriterionError, Inputs
from pruning.criteria.drop import extended
from pruning.units import Config, Unit


def score(inputs: Inputs, removed: Config, units: Config, n: int = 1) -> dict[Unit, float]:
    """log(ppl with `removed` plus each unit) - log(baseline ppl) on the calibration text."""
    if inputs.measure_ppl is None:
        raise CriterionError(
            "criterion ppl_drop needs calibration text: a perplexity task (e.g. wikitext, pydoc_ppl) among the tasks; none given"
        )
    return extended(inputs.measure_ppl, removed, units)
