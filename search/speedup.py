"""Speedup figures that can be trusted: paired rounds until the ratio's interval is tight, and the
most removing parameters can give.

Dense and pruned are timed in alternating rounds, so drift of a shared machine hits both alike.
Each round gives a paired ratio (dense time / pruned time); the speedup is their geometric mean
with a t interval on the log ratios. Rounds go on until both intervals (prefill, decode) are
within ±TARGET of the estimate, or the cap is reached.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

TARGET = 0.05  # the interval's half-width, relative to the estimate, at which timing stops
LEVEL = 0.95


def ratio_interval(dense: list[float], pruned: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(speedup, low, high): geometric mean of the paired ratios dense/pruned and its t interval."""
    logs = np.log(np.asarray(dense) / np.asarray(pruned))
    centre = float(np.mean(logs))
    if len(logs) < 2:
        return math.exp(centre), 0.0, math.inf
    half = float(stats.t.ppf(0.5 + level / 2, len(logs) - 1) * np.std(logs, ddof=1) / math.sqrt(len(logs)))
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


def tight(interval: tuple[float, float, float], target: float = TARGET) -> bool:
    """Whether the interval lies within ±target of its estimate."""
    estimate, low, high = interval
    return low >= estimate * (1 - target) and high <= estimate * (1 + target)


def block_parameters(model) -> int:
    """Parameters outside the input embedding and the output head: what removing units can take away."""
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def warnings_for(name: str, interval: tuple[float, float, float], bound: float, rounds: int, cap: int) -> list[str]:
    """Why the `name` speedup (e.g. prefill) is not to be trusted: an interval wider than ±TARGET at
    the cap, or an estimate above `bound`, the dense/pruned block-parameter ratio."""
    estimate, low, high = interval
    out = []
    if not tight(interval):
        out.append(
            f"{name} speedup {estimate:.2f}x is unreliable: its {LEVEL:.0%} interval {low:.2f}-{high:.2f}x is wider "
            f"than ±{TARGET:.0%} after {rounds} rounds (cap {cap}); the machine's timings vary too much"
        )
    if estimate > bound:
        out.append(
            f"{name} speedup {estimate:.2f}x is above {bound:.2f}x, the most removing these parameters can give "
            "(dense/pruned block parameters): the timing is disturbed, not a real gain"
        )
    return out
