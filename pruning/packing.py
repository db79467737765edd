"""Tokenized requests packed into batches of right-padded rows, longest first.

With shared context, the choices of a multiple-choice example are packed together, their common
tokens once and then each choice's own tokens; a 4D attention mask lets every choice see only the
shared tokens and itself, and its position ids continue from the shared tokens, so each choice is
computed exactly as if it were alone; a row holds several examples, so there is little padding.
"""

from __future__ import annotations

import bisect
import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pruning.compile import FLEX_ROW_TOKENS, bucketed
from pruning.encoding import _pairs_of
from pruning.tasks import Task

# Families whose packed rows (shared context) score like separate rows, checked in tests/test_evaluate.py.
SHARED_CONTEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "opt")
ROW_TOKENS = 256  # packed rows hold several examples up to this many tokens


@dataclass
class Batch:
    """Right-padded rows, which positions are scored, and the tokens they must predict.

    A plain row is one request. A packed row (shared context) holds examples one after the
    other, each as its requests' common prefix and then every request's remaining tokens. Each
    prefix and each request remainder is a segment (ids unique in the row, padding -1); a token
    attends to its own segment and to `prefixes`, the prefix segment of its example, and its
    `position_ids` count from its example's start, so every request is computed as if alone.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored: torch.Tensor  # bool (rows, width): positions whose next-token log-probability counts
    targets: torch.Tensor  # the token each scored position predicts, in row-major order
    owners: torch.Tensor  # the scored request (unit) each scored position belongs to
    request_index: list[list[int]]  # per row, the units it scores
    n_requests: int  # requests answered by this batch, duplicates included
    segments: torch.Tensor | None = None  # packed rows only
    prefixes: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


@dataclass
class PreparedTask:
    """A task tokenized and batched once, ready to be scored under many configurations."""

    task: Task
    batches: list[Batch]
    n_requests: int
    groups: list[list[int]]  # request indices per example
    target_lengths: list[int]  # scored tokens per request
    n_tokens: int  # tokens fed to the model per scoring pass, padding excluded
    unit_of: np.ndarray  # request -> scored unit (identical requests of an example are scored once)
    shared_context: bool
    flex: bool = False  # packed rows attend through flex_attention block masks


def shares_context(model: nn.Module, max_length: int) -> bool:
    """Whether packed rows with a custom 4D mask are scored exactly like separate rows on `model`:
    a tested family, attention that applies the mask as given (sdpa, eager), and no sliding
    window shorter than a row may be."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    sliding = set(getattr(config, "layer_types", None) or ["sliding_attention"]) - {"full_attention"}
    return (
        config.model_type in SHARED_CONTEXT_FAMILIES
        and config._attn_implementation in ("sdpa", "eager")
        and "position_ids" in inspect.signature(model.forward).parameters
        and not (isinstance(window, int) and sliding and window < max_length)
    )


def _item(units: list[tuple[int, list[int], list[int]]], packed: bool) -> dict:
    """Tokens and scored spans of one request, or (packed) of an example's requests together:
    their common prefix once, then each request's remaining tokens, with segment ids (prefix 0,
    requests 1, 2, ...) and position ids that, for every request, continue from the prefix."""
    if not packed:
        ((unit, seq, cont),) = units
        return {"tokens": seq, "spans": [(unit, len(seq) - len(cont), len(seq), cont)]}
    starts = [len(seq) - len(cont) for _, seq, cont in units]
    # the common prefix of the requests, up to the first scored position (commonprefix works on lists)
    shared = min(len(os.path.commonprefix([seq for _, seq, _ in units])), *starts)
    tokens, segments, positions, spans = list(units[0][1][:shared]), [0] * shared, list(range(shared)), []
    for s, ((unit, seq, cont), start) in enumerate(zip(units, starts), 1):
        offset = len(tokens) - shared  # where this request's position `shared` lands in the item
        spans.append((unit, offset + start, offset + len(seq), cont))
        tokens += seq[shared:]
        segments += [s] * (len(seq) - shared)
        positions += range(shared, len(seq))
    return {"tokens": tokens, "spans": spans, "segments": segments, "positions": positions, "n_segments": len(units) + 1}


def _fill_rows(items: list[dict], capacity: int) -> list[list[int]]:
    """Items per row, best fit in decreasing length, so that rows are about `capacity` tokens."""
    rows, free = [], []  # free: sorted (space left, row)
    for i in sorted(range(len(items)), key=lambda i: -len(items[i]["tokens"])):
        n = len(items[i]["tokens"])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            space, row = capacity - n, len(rows) - 1
        else:
            space, row = free.pop(k)
            rows[row].append(i)
            space -= n
        bisect.insort(free, (space, row))
    return rows


def _batch(rows: list[list[dict]], weights: np.ndarray, pad_id: int, packed: bool, bucket: bool = False) -> Batch:
    widths = [sum(len(item["tokens"]) for item in row) for row in rows]
    shape = bucketed(len(rows), max(widths)) if bucket else (len(rows), max(widths))
    rows = rows + [[]] * (shape[0] - len(rows))  # padding rows (bucketed batches)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    scored = torch.zeros(shape, dtype=torch.bool)
    segments = torch.full(shape, -1, dtype=torch.long) if packed else None
    prefixes = torch.full(shape, -1, dtype=torch.long) if packed else None
    positions = torch.zeros(shape, dtype=torch.long) if packed else None
    targets, owners = [], []
    for r, row in enumerate(rows):
        at, first_segment = 0, 0
        for item in row:  # items, and spans within them, in position order: targets are row-major
            end = at + len(item["tokens"])
            ids[r, at:end] = torch.tensor(item["tokens"])
            mask[r, at:end] = 1
            if packed:
                segments[r, at:end] = torch.tensor(item["segments"]) + first_segment
                prefixes[r, at:end] = first_segment
                positions[r, at:end] = torch.tensor(item["positions"])
                first_segment += item["n_segments"]
            for unit, start, stop, cont in item["spans"]:
                scored[r, at + start : at + stop] = True
                targets += cont
                owners += [unit] * len(cont)
            at = end
    request_index = [[unit for item in row for unit, *_ in item["spans"]] for row in rows]
    n_requests = int(sum(weights[unit] for units in request_index for unit in units))
    return Batch(
        ids, mask, scored, torch.tensor(targets), torch.tensor(owners), request_index, n_requests, segments, prefixes, positions
    )


def prepare(
    task: Task,
    tokenizer,
    batch_size: int,
    max_length: int,
    pad_id: int,
    shared_context: bool = True,
    tokenized: tuple | None = None,
    flex: bool = False,
    bucket: bool = False,
) -> PreparedTask:
    """Tokenize `task` and batch it by length, longest first, `batch_size` rows a batch.

    With `shared_context`, all requests of a multiple-choice example share their common prefix
    (see `_item`), and rows hold several examples, up to ROW_TOKENS tokens (FLEX_ROW_TOKENS with
    `flex`: block-sparse attention, see `pruning.compile`; or the longest example), so that
    there is little padding. Identical requests of an example are scored once. With `bucket`,
    batches are padded to few shapes (`pruning.compile.bucketed`, for compiled blocks). `tokenized` is
    `_pairs_of(task, ...)` when the caller has it already.
    """
    pairs, groups = tokenized or _pairs_of(task, tokenizer, max_length)
    seqs = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in pairs]
    packed = shared_context and task.kind == "multiple_choice"
    unit_of = np.zeros(len(pairs), dtype=np.int64)
    items, n_units = [], 0
    for group in groups:
        units = {}
        for i in group:
            key = (tuple(seqs[i]), tuple(pairs[i][1]))
            if key not in units:
                units[key] = (n_units, seqs[i], pairs[i][1])
                n_units += 1
            unit_of[i] = units[key][0]
        members = list(units.values())
        items += [_item(members, True)] if packed else [_item([u], False) for u in members]
    if packed:
        capacity = max(FLEX_ROW_TOKENS if flex else ROW_TOKENS, *(len(item["tokens"]) for item in items))
        rows = [[items[i] for i in row] for row in _fill_rows(items, capacity)]
    else:
        rows = [[item] for item in items]
    rows.sort(key=lambda row: -sum(len(item["tokens"]) for item in row))  # stable: ties keep task order
    weights = np.bincount(unit_of, minlength=n_units)
    batches = [_batch(rows[s : s + batch_size], weights, pad_id, packed, bucket) for s in range(0, len(rows), batch_size)]
    return PreparedTask(
        task,
        batches,
        len(pairs),
        groups,
        [len(cont) for _, cont in pairs],
        sum(len(item["tokens"]) for item in items),
        unit_of,
        packed,
        packed and flex,
    )


def packed_attention_mask(segments: torch.Tensor, prefixes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (rows, 1, width, width) mask of packed rows: a token sees, causally, its own segment
    and the prefix segment of its example (padding, segment -1, sees padding: no row is empty)."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    key = segments[:, None, :]
    allowed = causal & ((key == segments[:, :, None]) | (key == prefixes[:, :, None]))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
