"""Procedures: how units are chosen from a criterion's scores (DESIGN.md, "Units, criteria, procedures").

- `one_shot`: score every unit once on the unpruned model and remove the k lowest (ShortGPT's Block
  Influence, Shortened LLaMA's PPL and Taylor+); a windowed criterion (angular distance, Gromov et
  al.) removes the window of k consecutive blocks that scores lowest;
- `greedy`: re-score the remaining units after every removal and remove the lowest, width 1, as
  SLEB does: search.beam's search with beam_width 1;
- `beam`: search.beam's beam search (prunetrack's own), any width;
- `last_n`: the baseline of "Reassessing Layer Pruning" (Lu et al. 2024): the last k blocks before
  the final one.

greedy and beam re-score configurations, so they take a criterion that measures them (`drop`,
`ppl_drop`); the criteria read from the unpruned model (Block Influence, angular distance, Taylor)
go with one_shot. Each procedure gives the configuration it removes for k = 1..K.
"""

from __future__ import annotations

import importlib

from pruning import criteria
from pruning.units import Config, Unit, normalize
from search.cli import SearchError

PROCEDURES = ("beam", "greedy", "one_shot", "last_n")


class ProcedureError(SearchError):
    """An unknown procedure, or one that cannot run with the criterion given."""


def check(criterion: str, procedure: str) -> None:
    """Reject an unknown criterion or procedure, and a search over a criterion that does not measure."""
    if procedure not in PROCEDURES:
        raise ProcedureError(f"unknown procedure {procedure!r}; allowed: {', '.join(PROCEDURES)}")
    if procedure == "last_n":
        return
    found = criteria.get(criterion)
    if procedure in ("beam", "greedy") and not found.measures:
        raise ProcedureError(
            f"procedure {procedure} re-scores after each removal, criterion {criterion} scores the unpruned model only; "
            "allowed with it: one_shot, last_n"
        )


def one_shot(criterion: str, inputs: criteria.Inputs, units: Config, k_max: int) -> list[Config]:
    """The configurations of k = 1..k_max units with the lowest scores (ties: the lower unit), ranked
    once; for a windowed criterion, the lowest-scoring window of k blocks for each k."""
    module = importlib.import_module(f"pruning.criteria.{criterion}")
    if getattr(module, "WINDOW", False):
        configs = []
        for k in range(1, k_max + 1):
            scores = criteria.score(criterion, inputs, (), units, n=k)
            start = min((s, u) for u, s in scores.items() if u.is_block)[1].block
            configs.append(normalize(Unit(b) for b in range(start, start + k)))
        return configs
    scores = criteria.score(criterion, inputs, (), units)
    order = sorted(units, key=lambda u: (scores[u], u))
    return [normalize(order[:k]) for k in range(1, k_max + 1)]


def last_n(num_blocks: int, k_max: int) -> list[Config]:
    """The last k blocks before the final one, for k = 1..k_max."""
    if k_max > num_blocks - 1:
        raise ProcedureError(
            f"last_n removes at most {num_blocks - 1} of {num_blocks} blocks (the final one stays); got k {k_max}"
        )
    return [normalize(Unit(b) for b in range(num_blocks - 1 - k, num_blocks - 1)) for k in range(1, k_max + 1)]


def beam_width(procedure: str, width: int) -> int:
    """The beam width a search procedure runs with: 1 for greedy."""
    return 1 if procedure == "greedy" else width
