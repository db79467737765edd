"""Batched log-likelihood scoring: multiple-choice accuracy and perplexity, per example.

Requests are tokenized exactly as lm-eval-harness's HF model class does (trailing context
spaces move to the continuation, the continuation is the tail of the whole encoding, an
empty context is replaced by the BOS/EOS token), documents are cut into lm-eval's rolling
windows, and `acc` / `acc_norm` follow lm-eval's definitions: argmax of the summed
log-likelihood, and of the log-likelihood divided by the choice's character length.

What makes it fast, with the same scores:
- shared context: the choices of a multiple-choice example are packed together, their common
  tokens once and then each choice's own tokens; a 4D attention mask lets every choice see
  only the shared tokens and itself, and its position ids continue from the shared tokens,
  so each choice is computed exactly as if it were alone; a row holds several examples, so
  there is little padding;
- logits only at the scored positions; rows batched by length, longest first;
- step-wide scoring of many removals (blocks, sublayers) at once, data chunk by data chunk (`Evaluator`);
- optionally (on by default on CUDA), the blocks compiled once and packed rows attending through
  flex_attention block masks, in rows of thousands of tokens (`pruning.compile`).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import inspect
import logging
import math
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pruning.compile import FLEX_ROW_TOKENS, attention, bucketed, compile_blocks, flex_reason, packed_block_mask
from pruning.tasks import Task
from pruning.units import check_config, first_block, removed_blocks

logger = logging.getLogger(__name__)

SCORER_VERSION = "3"  # part of every configuration hash: bump when scores would change
DEFAULT_MAX_LENGTH = 2048
# Families whose packed rows (shared context) score like separate rows, checked in tests/test_evaluate.py.
SHARED_CONTEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "opt")
_LOGPROB_CHUNK = 2**26  # logits converted to float32 at a time
ROW_TOKENS = 256  # packed rows hold several examples up to this many tokens
FIRST_LOOK = 1 / 16  # share of each task in the first chunk(s): racing's first look
MIN_LOOK_EXAMPLES = 32  # examples of each task seen at the first look, at least


@dataclass
class TaskScore:
    """Aggregate metrics and the per-example results behind them."""

    task: str
    kind: str
    metrics: dict[str, float]
    per_example: dict[str, list] = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.per_example["doc_id"])


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


def max_length_of(model: nn.Module) -> int:
    """The model's context length, as lm-eval resolves it (2048 when the config has none)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int):
            return value
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty context (BOS, else EOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, text: str) -> list[int]:
    """`text` encoded as lm-eval's HFLM.tok_encode does: with the tokenizer's own special tokens
    (a BOS for Llama-2 and Gemma style tokenizers), unless the text already starts with the BOS text."""
    bos = tokenizer.decode(prefix_token_id(tokenizer))
    kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    return tokenizer.encode(text, **kwargs)


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's HFLM builds them."""
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint prediction windows over a document, as lm-eval's loglikelihood_rolling cuts them
    (`get_rolling_token_windows` with context_len 1, then `make_disjoint_window`): every token of
    `tokens` is predicted once, the first from `prefix`, in windows of `max_length` tokens. `tokens`
    is the document as `_encode` gives it, so a tokenizer's BOS is itself predicted from `prefix`,
    exactly as lm-eval scores it."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_length)
        end = predicted + n_pred
        window = tokens[max(end - max_length - 1, 0) : end - 1]
        windows.append((window, tokens[end - n_pred : end]))
        predicted += n_pred
    # (input, targets) -> (context, continuation) whose concatenation ends with the targets
    return [(inp[: len(inp) - len(tgt) + 1], tgt) for inp, tgt in windows]


def _pairs_of(task: Task, tokenizer, max_length: int) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
    pairs, groups = [], []
    for example in task.examples:
        if task.kind == "multiple_choice":
            new = [encode_request(tokenizer, c, x) for c, x in example.requests]
        else:
            new = rolling_windows(_encode(tokenizer, example.text), prefix_token_id(tokenizer), max_length)
        groups.append(list(range(len(pairs), len(pairs) + len(new))))
        pairs.extend(new)
    return pairs, groups


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


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of `logits` (float32 log-softmax, a slice at a time)."""
    step = max(1, _LOGPROB_CHUNK // logits.shape[-1])
    parts = []
    for i in range(0, len(targets), step):
        logprobs = torch.log_softmax(logits[i : i + step].float(), dim=-1)
        parts.append(logprobs.gather(-1, targets[i : i + step, None])[:, 0])
    return torch.cat(parts)


@torch.no_grad()
def loglikelihoods(model: nn.Module, prepared: PreparedTask, progress=None, before_batch=None) -> np.ndarray:
    """Summed log-probability of every request's continuation given its context.

    `before_batch(i)` is called before batch i runs (step-wide scoring uses it). Packed rows
    attend through a dense 4D mask, or through flex_attention block masks (`prepared.flex`).
    """
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    if prepared.flex and model.config._attn_implementation != "flex_attention":
        with attention(model, "flex_attention"):
            return loglikelihoods(model, prepared, progress, before_batch)
    sums = np.zeros(int(prepared.unit_of.max()) + 1, dtype=np.float64)
    for b, batch in enumerate(prepared.batches):
        if before_batch is not None:
            before_batch(b)
        inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
        if batch.segments is not None:
            segments, prefixes = batch.segments.to(device), batch.prefixes.to(device)
            if prepared.flex:
                inputs["attention_mask"] = packed_block_mask(segments, prefixes)
            else:
                inputs["attention_mask"] = packed_attention_mask(segments, prefixes, dtype)
            inputs["position_ids"] = batch.position_ids.to(device)
        logits = model(**inputs, use_cache=False, logits_to_keep=batch.scored.to(device)).logits
        picked = _target_logprobs(logits, batch.targets.to(device))
        np.add.at(sums, batch.owners.numpy(), picked.double().cpu().numpy())
        if progress is not None:
            progress.update(batch.input_ids.numel())  # padded tokens: work of even cost (search.progress)
    return sums[prepared.unit_of]


def task_score(task: Task, examples: list[int], lls: list[np.ndarray], tokens: list[int]) -> TaskScore:
    """Metrics of `task` over its examples `examples` (indices, in task order), from each one's
    request log-likelihoods `lls` and scored tokens `tokens`.

    Multiple choice: `acc` (argmax of the summed log-likelihood) and, where the task defines it
    (`task.metrics`), `acc_norm` (argmax of the log-likelihood over the choice's character length).
    Perplexity, as lm-eval aggregates a rolling task: `word_perplexity` = exp(NLL / words),
    `byte_perplexity` = exp(NLL / bytes), `bits_per_byte` = NLL / bytes / ln 2, with the words and
    bytes of each document counted as the task's lm-eval definition counts them (`Document.words`,
    `.bytes`); and `ppl` = exp(NLL / scored tokens), which depends on the tokenizer and the rolling
    window length. NLL and counts are summed over the documents before dividing.
    """
    chosen = [task.examples[i] for i in examples]
    doc_ids = [ex.doc_id for ex in chosen]
    if task.kind == "multiple_choice":
        correct = [int(np.argmax(ll) == ex.gold) for ll, ex in zip(lls, chosen)]
        per_example = {"doc_id": doc_ids, "acc": correct}
        metrics = {"acc": float(np.mean(correct))}
        if "acc_norm" in task.metrics:
            correct_norm = [int(np.argmax(ll / np.array(ex.choice_lengths)) == ex.gold) for ll, ex in zip(lls, chosen)]
            per_example["acc_norm"] = correct_norm
            metrics["acc_norm"] = float(np.mean(correct_norm))
        per_example["loglikelihoods"] = [ll.tolist() for ll in lls]
        return TaskScore(task.name, task.kind, metrics, per_example)
    nll = [float(-ll.sum()) for ll in lls]
    words = [ex.words for ex in chosen]
    n_bytes = [ex.bytes for ex in chosen]
    total = sum(nll)
    metrics = {
        "ppl": math.exp(total / sum(tokens)),
        "word_perplexity": math.exp(total / sum(words)),
        "byte_perplexity": math.exp(total / sum(n_bytes)),
        "bits_per_byte": total / sum(n_bytes) / math.log(2),
    }
    per_example = {"doc_id": doc_ids, "nll": nll, "tokens": list(tokens), "words": words, "bytes": n_bytes}
    return TaskScore(task.name, task.kind, metrics, per_example)


def look_sizes(n: int) -> list[int]:
    """Examples of a task seen after each racing look: FIRST_LOOK of them (at least
    MIN_LOOK_EXAMPLES), then twice as many at each look, until all n."""
    sizes = [min(n, max(MIN_LOOK_EXAMPLES, math.ceil(n * FIRST_LOOK)))]
    while sizes[-1] < n:
        sizes.append(min(n, 2 * sizes[-1]))
    return sizes


@dataclass
class Chunk:
    """Examples of one task scored together: the unit whose block states are kept at a time."""

    task: int  # index in Evaluator.tasks
    look: int  # the racing look after which this chunk's results are complete
    examples: list[int]  # indices into the task's examples
    prepared: PreparedTask
    state_bytes: int  # one block's outputs for this chunk (padded rows)


@dataclass
class ConfigScores:
    """What step-wide scoring gives for one configuration."""

    scores: dict[str, TaskScore] | None  # complete, or over the examples seen before it stopped
    stopped: str | None = None  # why racing stopped it
    error: Exception | None = None  # why its scoring failed

    @property
    def n_examples(self) -> int:
        """Examples scored, summed over the tasks."""
        return sum(s.n for s in self.scores.values()) if self.scores else 0


class _Replay(nn.Module):
    """Stands in for the first blocks: returns the kept output of the last of them for the batch."""

    def __init__(self, states: dict, block: int, as_tuple: bool):
        super().__init__()
        self.states, self.block, self.as_tuple, self.batch = states, block, as_tuple, None

    def forward(self, hidden_states, *args, **kwargs):
        state = self.states[(self.block, self.batch)].to(hidden_states.device, non_blocking=True)
        return (state,) if self.as_tuple else state


class Evaluator:
    """Scores a fixed set of tasks with any sets of units (blocks, sublayers) removed, step-wide.

    The data is cut once into chunks (seeded order, see `look_sizes`), each small enough that the
    outputs of every block for it fit `chunk_budget_gb`. `evaluate_many(configs)` scores a set
    of configurations chunk by chunk: the unpruned model runs once on the chunk, up to the last
    block some configuration starts from, keeping those blocks' outputs for this chunk only; each
    configuration then runs from the kept output of the block below its first touched block; the
    states are dropped before the next chunk. Kept-state memory is bounded by one chunk whatever
    the data size, and every configuration's per-example scores are those of evaluating it alone
    (the same batches, and the blocks below its first touched block are the unpruned model's).
    With a `Race`, configurations that are confidently out of the beam stop after a look.
    `shared_context` packs the choices of a multiple-choice example into one row where the model
    allows it (`shares_context`). `compile` runs the model's blocks compiled (`pruning.compile`;
    in place, until an Evaluator without it); `flex` (None: whenever compiled and the model
    allows it, `flex_reason`) lets packed rows attend through flex_attention block masks instead
    of dense 4D masks; the choice is logged.
    """

    def __init__(
        self,
        loaded,
        tasks: list[Task],
        batch_size: int = 8,
        max_length: int | None = None,
        chunk_budget_gb: float = 4.0,
        shared_context: bool = True,
        compile: bool = False,
        flex: bool | None = None,
    ):
        self.loaded, self.tasks, self.batch_size = loaded, list(tasks), batch_size
        self.max_length = max_length = max_length or max_length_of(loaded.model)
        self.shared_context = shared_context and shares_context(loaded.model, max_length)
        self.compiled = compile
        self.flex = self._choose_attention(flex)
        self.chunk_budget = int(chunk_budget_gb * 2**30)
        width = loaded.model.get_input_embeddings().embedding_dim
        self._token_bytes = width * next(loaded.model.parameters()).element_size()
        self.kept_blocks = max(1, loaded.num_blocks - 1)  # the most block outputs a chunk may keep
        self.observer = None  # e.g. pruning.criteria.states.BlockStates: watches every baseline pass
        self.chunks: list[Chunk] = []
        self.tokens: list[list[int]] = []  # scored tokens per example, per task
        for t, task in enumerate(self.tasks):
            self._cut(t, task, max_length)
        self.n_looks = max(c.look for c in self.chunks) + 1

    def _choose_attention(self, flex: bool | None) -> bool:
        """Compile the blocks (or not), and whether packed rows use flex_attention; logged."""
        compile_blocks(self.loaded.blocks, self.compiled)
        reason = flex_reason(self.loaded.model)
        use = self.shared_context and reason is None and (self.compiled if flex is None else flex)
        if self.shared_context:
            why = f" ({reason})" if reason and self.compiled else ""
            attention_path = "flex_attention block masks" if use else f"dense 4D masks{why}"
            logger.info(f"scoring: blocks {'compiled' if self.compiled else 'eager'}, packed rows with {attention_path}")
        return use

    @property
    def n_requests(self) -> int:
        return sum(c.prepared.n_requests for c in self.chunks)

    @property
    def n_tokens(self) -> int:
        """Padded tokens of scoring one configuration on all chunks (the unit of its progress)."""
        return sum(b.input_ids.numel() for c in self.chunks for b in c.prepared.batches)

    @property
    def max_state_bytes(self) -> int:
        """The most memory kept block outputs can take at once: every block but the last, one chunk."""
        return self.kept_blocks * max(c.state_bytes for c in self.chunks)

    def _cut(self, t: int, task: Task, max_length: int) -> None:
        """Split task `t` into chunks: a seeded order, cut at the looks, then by the memory budget."""
        pairs, groups = _pairs_of(task, self.loaded.tokenizer, max_length)
        self.tokens.append([sum(len(pairs[i][1]) for i in g) for g in groups])
        order = np.random.default_rng(zlib.crc32(task.name.encode())).permutation(len(groups)).tolist()
        seen = 0
        for look, size in enumerate(look_sizes(len(groups))):
            pending = [order[seen:size]]
            seen = size
            while pending:
                examples = sorted(pending.pop(0))
                chunk = self._chunk(t, task, look, examples, pairs, groups, max_length)
                if chunk.state_bytes * self.kept_blocks > self.chunk_budget and len(examples) > 1:
                    half = len(examples) // 2
                    pending[:0] = [examples[:half], examples[half:]]
                else:
                    self.chunks.append(chunk)

    def _chunk(self, t, task, look, examples, pairs, groups, max_length) -> Chunk:
        sub_pairs, sub_groups = [], []
        for e in examples:
            sub_groups.append(list(range(len(sub_pairs), len(sub_pairs) + len(groups[e]))))
            sub_pairs += [pairs[i] for i in groups[e]]
        sub_task = dataclasses.replace(task, examples=[task.examples[e] for e in examples])
        prepared = prepare(
            sub_task,
            self.loaded.tokenizer,
            self.batch_size,
            max_length,
            self.loaded.tokenizer.pad_token_id,
            self.shared_context,
            (sub_pairs, sub_groups),
            self.flex,
            self.compiled,
        )
        numel = sum(b.input_ids.numel() for b in prepared.batches)
        return Chunk(t, look, examples, prepared, numel * self._token_bytes)

    def storage_device(self) -> torch.device:
        """Where kept states live: the model's GPU when a chunk's fit with a quarter of it left
        free, else host memory (pinned, filled asynchronously)."""
        device = self.loaded.device
        if device.type != "cuda":
            return torch.device("cpu")
        free, total = torch.cuda.mem_get_info(device)
        return device if self.max_state_bytes < free - total // 4 else torch.device("cpu")

    def evaluate(self, removed=(), progress=None) -> dict[str, TaskScore]:
        """Scores per task with the units `removed` (pruning.units: blocks, sublayers) taken out."""
        (result,) = self.evaluate_many([removed], progress).values()
        if result.error is not None:
            raise result.error
        return result.scores

    def evaluate_many(self, configs, progress=None, race=None) -> dict:
        """Score every configuration (a set of removed units: Units, `a4`-style names or block
        indices; pruning.units) step-wide, chunk by chunk; the results are keyed by the
        configurations as given. A configuration is normalized and checked first
        (pruning.units.check_config: UnitError), so `(a4, m4)` is `(b4,)` and scored once.

        A configuration whose scoring raises (other than out of memory, which ends the whole
        set) comes back with its error; with `race`, one that stops comes back with the scores
        of the examples it saw and the reason.
        """
        given = {c: check_config(c, self.loaded.num_blocks) for c in configs}
        configs = list(dict.fromkeys(given.values()))
        active = list(configs)
        lls = {c: [{} for _ in self.tasks] for c in configs}  # per task: example -> request log-likelihoods
        stopped, errors = {}, {}
        for look in range(self.n_looks):
            for chunk in (c for c in self.chunks if c.look == look):
                for removed, err in self._score_chunk(chunk, active, lls, progress).items():
                    errors[removed] = err
                    active.remove(removed)
            if race is not None and look < self.n_looks - 1 and active:
                for removed, reason in race.stop(self, {c: lls[c] for c in active}).items():
                    stopped[removed] = reason
                    active.remove(removed)
        results = {
            c: ConfigScores(None, error=errors[c]) if c in errors else ConfigScores(self.task_scores(lls[c]), stopped.get(c))
            for c in configs
        }
        return {c: results[normal] for c, normal in given.items()}

    def task_scores(self, lls: list[dict]) -> dict[str, TaskScore]:
        """TaskScores from per-example request log-likelihoods (all examples, or those seen)."""
        scores = {}
        for t, task in enumerate(self.tasks):
            seen = sorted(lls[t])
            scores[task.name] = task_score(task, seen, [lls[t][e] for e in seen], [self.tokens[t][e] for e in seen])
        return scores

    def _score_chunk(self, chunk: Chunk, configs: list, lls: dict, progress) -> dict:
        """Score `configs` on one chunk into `lls`; returns the configurations that failed, with their error."""
        starts = sorted({first_block(c) - 1 for c in configs if c and first_block(c) > 0})
        states, as_tuple = self._record(chunk, starts, lls[()] if () in configs else None, progress)
        errors = {}
        for removed in configs:
            if not removed:
                continue
            try:
                values = self._score_config(chunk, removed, states, as_tuple, progress)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # this configuration fails; the others go on
                errors[removed] = err
                continue
            self._store(chunk, values, lls[removed])
        return errors

    def _store(self, chunk: Chunk, values: np.ndarray, into: list[dict]) -> None:
        for e, group in zip(chunk.examples, chunk.prepared.groups):
            into[chunk.task][e] = values[group]

    def _score_config(self, chunk: Chunk, removed: tuple, states: dict, as_tuple: bool, progress) -> np.ndarray:
        """Request log-likelihoods of one configuration on a chunk, from the kept state below its first touched block."""
        from pruning.families import sublayers_removed, units_removed
        from pruning.models import blocks_replaced

        start = first_block(removed)
        if start == 0:
            with units_removed(self.loaded, removed):
                return loglikelihoods(self.loaded.model, chunk.prepared, progress)
        replay = _Replay(states, start - 1, as_tuple)
        blocks = removed_blocks(removed)
        origins = [start - 1] + [i for i in range(start, self.loaded.num_blocks) if i not in blocks]
        modules = [replay] + [self.loaded.blocks[i] for i in origins[1:]]
        with sublayers_removed(self.loaded, removed), blocks_replaced(self.loaded, modules, origins):
            return loglikelihoods(self.loaded.model, chunk.prepared, progress, lambda b: setattr(replay, "batch", b))

    def _record(self, chunk: Chunk, blocks: list[int], baseline: list[dict] | None, progress) -> tuple[dict, bool]:
        """Run the unpruned model on a chunk, keeping the outputs of `blocks` per batch; when
        `baseline` is given, score it there too, else stop after the last kept block."""
        from pruning.models import blocks_replaced

        if not blocks and baseline is None:
            return {}, False
        states, current, as_tuple = {}, {}, [False]
        to_host = self.storage_device().type == "cpu" and self.loaded.device.type == "cuda"

        def keep(block: int):
            def hook(module, args, output):
                as_tuple[0] = isinstance(output, tuple)
                state = (output[0] if as_tuple[0] else output).detach()
                if to_host:
                    state = torch.empty(state.shape, dtype=state.dtype, pin_memory=True).copy_(state, non_blocking=True)
                else:
                    state = state.clone()
                states[(block, current["batch"])] = state

            return hook

        handles = [self.loaded.blocks[j].register_forward_hook(keep(j)) for j in blocks]
        last = self.loaded.num_blocks if baseline is not None else blocks[-1] + 1
        observing = contextlib.nullcontext()
        if baseline is not None and self.observer is not None:
            observing = self.observer.observing(self.loaded, lambda: chunk.prepared.batches[current["batch"]].attention_mask)
        try:
            with blocks_replaced(self.loaded, list(self.loaded.blocks)[:last], list(range(last))), observing:
                values = loglikelihoods(
                    self.loaded.model,
                    chunk.prepared,
                    progress if baseline is not None else None,
                    lambda b: current.__setitem__("batch", b),
                )
        finally:
            for handle in handles:
                handle.remove()
        if baseline is not None:
            self._store(chunk, values, baseline)
        return states, as_tuple[0]
