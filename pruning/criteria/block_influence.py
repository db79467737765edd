"""Criterion `block_influence`: ShortGPT's Block Influence, BI_l = 1 - E_tokens[cos(x_l, x_{l+1})],
the expected cosine distance between a block's input and output hidden states over every token of
the data (ShortGPT, Men et al. 2024, eq. 2; the public implementations' `block_influence` flatten
batch and sequence and average 1 - cos over all tokens). Ranked once (ShortGPT removes the lowest
BI). Sublayers: the same between a residual branch's input and the residual stream after it.

Read from the block states of the unpruned model's pass (criteria.states): 0 extra forward passes.
"""

from __future__ import annotations

from pruning.criteria import CriterionError, Inputs, baseline_states
from pruning.units import Config, Unit


def score(inputs: Inputs, removed: Config, units: Config, n: int = 1) -> dict[Unit, float]:
    """BI of each unit in the unpruned model (`removed` must be empty: the criterion is static)."""
    states = baseline_states("block_influence", inputs, removed)
    if any(not u.is_block for u in units) and not states.sublayers:
        raise CriterionError("criterion block_influence: sublayer values need a sequential pre-norm family")
    values = {kind: states.influence(kind) for kind in {u.kind for u in units}}
    return {u: values[u.kind][u.block] for u in units}
