"""Removal units: what a configuration takes out of a model.

A unit is a whole block (`b4`), the attention sublayer of a block (`a4`) or its MLP sublayer
(`m4`). A configuration is a set of units, kept in one normal form (`normalize`): a block's two
sublayers together are the block itself, a removed block absorbs its sublayers, and units are
sorted by block, then kind. So removing `a4` and `m4` is the configuration `b4`, with the same hash.

This module imports neither torch nor mlflow: the search, the claims table, the tracking
contract (contract.records) and analysis all share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK, ATTENTION, MLP = "b", "a", "m"
KIND_NAMES = {BLOCK: "block", ATTENTION: "attention", MLP: "mlp"}
SUBLAYERS = (ATTENTION, MLP)
_UNIT = re.compile(r"^([abm]?)(\d+)(?:-(\d+))?$")


class UnitError(ValueError):
    """A unit or unit list that does not parse, is out of range, or removes the whole model."""


@dataclass(frozen=True, order=True)
class Unit:
    """One removable part of block `block`: the block (`b`), its attention (`a`) or its MLP (`m`)."""

    block: int
    kind: str = BLOCK

    def __post_init__(self):
        if self.kind not in KIND_NAMES:
            raise UnitError(f"unknown unit kind {self.kind!r}; allowed: b (block), a (attention), m (mlp)")

    def __str__(self) -> str:
        return f"{self.kind}{self.block}"

    @property
    def is_block(self) -> bool:
        return self.kind == BLOCK


Config = tuple[Unit, ...]


def normalize(units) -> Config:
    """The normal form of a set of units (Unit, `b4`/`a4`/`m4` strings or whole-block ints):
    a block's attention and MLP together become the block, a removed block absorbs its sublayers,
    sorted by block then kind, no duplicates."""
    parsed = {_as_unit(u) for u in units}
    blocks = {u.block for u in parsed if u.is_block}
    sub = {}
    for u in parsed:
        if not u.is_block and u.block not in blocks:
            sub.setdefault(u.block, set()).add(u.kind)
    blocks |= {b for b, kinds in sub.items() if kinds == set(SUBLAYERS)}
    kept = [Unit(b) for b in blocks] + [Unit(b, k) for b, kinds in sub.items() if b not in blocks for k in kinds]
    return tuple(sorted(kept))


def _as_unit(value) -> Unit:
    if isinstance(value, Unit):
        return value
    if isinstance(value, int):
        return Unit(value)
    (unit,) = parse_units(str(value))
    return unit


def parse_units(text: str, what: str = "units") -> Config:
    """Units from `a4,m13,b20`; a bare index is a whole block (`4` is `b4`) and a range covers
    every block in it (`b3-5`, `a0-3`, `3-5`). Empty text is the empty configuration. Not
    normalized: `parse_units('a4,m4')` keeps both sublayers."""
    units = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _UNIT.match(part)
        first, last = (int(match[2]), int(match[3] or match[2])) if match else (0, -1)
        if last < first:
            raise UnitError(
                f"{what} {text!r}: cannot parse {part!r}; allowed: comma-separated units b<i> (block), "
                "a<i> (attention), m<i> (mlp), a bare block index, or a range such as b3-5"
            )
        units += [Unit(b, match[1] or BLOCK) for b in range(first, last + 1)]
    return tuple(units)


def parse_blocks(text: str, what: str = "blocks") -> tuple[int, ...]:
    """Sorted whole-block indices from `0,3,5-7` (parse_units' syntax, ranges inclusive, whole
    blocks only); empty for ''."""
    try:
        units = parse_units(text, what)
    except UnitError:
        units = None
    if units is None or not all(u.is_block for u in units):
        raise UnitError(f"{what} {text!r} is not a list of block indices; allowed: e.g. 0,29 or 0-3,29")
    return tuple(sorted({u.block for u in units}))


def check_config(units, num_blocks: int, what: str = "units") -> Config:
    """The normal form of `units`, checked against a model of `num_blocks` blocks: every index in
    range, and at least one block left with something in it."""
    config = normalize(units)
    bad = [u for u in config if not 0 <= u.block < num_blocks]
    if bad:
        raise UnitError(f"{what}: unit {bad[0]} out of range; allowed blocks 0..{num_blocks - 1}")
    if len(removed_blocks(config)) == num_blocks:
        raise UnitError(f"{what}: cannot remove every block (or every sublayer of every block) of {num_blocks}")
    return config


def removed_blocks(config: Config) -> tuple[int, ...]:
    """The whole blocks a configuration removes, sorted."""
    return tuple(u.block for u in config if u.is_block)


def first_block(config: Config) -> int | None:
    """The lowest block a configuration touches (None for the empty configuration)."""
    return min((u.block for u in config), default=None)


def is_blocks_only(config: Config) -> bool:
    """Whether every unit is a whole block (a configuration as prunetrack wrote them before sublayers)."""
    return all(u.is_block for u in config)


def label(config: Config) -> str:
    """The `removed_units` tag: `a4,m13,b20`, in normal order; empty for the baseline."""
    return ",".join(map(str, normalize(config)))


def identity(config: Config) -> list:
    """What a configuration contributes to its hash: block indices when it removes only whole
    blocks (exactly what hashes held before sublayers, so upgrading recomputes nothing), else its
    unit names."""
    config = normalize(config)
    return list(removed_blocks(config)) if is_blocks_only(config) else [str(u) for u in config]


def all_units(num_blocks: int, removal_unit: str) -> Config:
    """The units a search over `removal_unit` may remove: every block (`block`), both sublayers
    of every block (`sublayer`), or both together (`both`)."""
    kinds = {"block": (BLOCK,), "sublayer": SUBLAYERS, "both": (BLOCK, *SUBLAYERS)}
    if removal_unit not in kinds:
        raise UnitError(f"unknown removal_unit {removal_unit!r}; allowed: {', '.join(kinds)}")
    return tuple(Unit(b, k) for b in range(num_blocks) for k in kinds[removal_unit])
