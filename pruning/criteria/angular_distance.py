"""Criterion `angular_distance`: Gromov et al., "The Unreasonable Ineffectiveness of the Deeper
Layers" (2024), eq. (7): d(x_l, x_{l+n}) = arccos(cos(x_l, x_{l+n})) / pi between the input of block l
and the input of block l+n, on the last token of each sequence, averaged over the data; to remove n
blocks they take the window l*..l*+n-1 with the smallest distance. The score of block unit l is that
of the window of `n` blocks starting at l (inf where the window would pass the last block); a
procedure that honours windows (search.procedures.one_shot) removes the best window. Sublayers (n = 1):
the distance across one residual branch.

Read from the block states of the unpruned model's pass (criteria.states): 0 extra forward passes.
"""

from __future__ import annotations

import math

from pruning.criteria import CriterionError, Inputs, baseline_states
from pruning.units import ATTENTION, Config, Unit

WINDOW = True  # a unit's score is that of the window of n blocks starting at it


def score(inputs: Inputs, removed: Config, units: Config, n: int = 1) -> dict[Unit, float]:
    """Angular distance of each unit (window of `n` blocks from a block unit) in the unpruned model."""
    states = baseline_states("angular_distance", inputs, removed)
    scores = {}
    for u in units:
        if u.is_block:
            end = u.block + n
            scores[u] = states.angular(states.last[u.block], states.last[end]) if end <= states.num_blocks else math.inf
        elif not states.sublayers:
            raise CriterionError("criterion angular_distance: sublayer values need a sequential pre-norm family")
        elif u.kind == ATTENTION:
            scores[u] = states.angular(states.last[u.block], states.last_mid[u.block])
        else:
            scores[u] = states.angular(states.last_mid[u.block], states.last[u.block + 1])
    return scores
