"""Batched log-likelihood scoring: multiple-choice accuracy and perplexity, per example, step-wide.

Requests are tokenized exactly as lm-eval-harness's HF model class does (`pruning.encoding`),
packed into rows that share an example's context (`pruning.packing`), scored at the scored
positions only (`pruning.loglikelihoods`), and `acc` / `acc_norm` and the perplexities follow
lm-eval's definitions (`pruning.metrics`).

What makes it fast, with the same scores:
- shared context: the choices of a multiple-choice example are packed together (`pruning.packing`);
- logits only at the scored positions; rows batched by length, longest first;
- step-wide scoring of many removals (blocks, sublayers) at once, data chunk by data chunk (`Evaluator`);
- optionally (on by default on CUDA), the blocks compiled once and packed rows attending through
  flex_attention block masks, in rows of thousands of tokens (`pruning.compile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pruning.compile import compile_blocks, flex_reason
from pruning.encoding import _pairs_of, max_length_of
from pruning.loglikelihoods import loglikelihoods
from pruning.metrics import TaskScore, task_score
from pruning.packing import PreparedTask, prepare, shares_context
from pruning.tasks import Task
from pruning.units import check_config, first_block, removed_blocks

logger = logging.getLogger(__name__)

SCORER_VERSION = "3"  # part of every configuration hash: bump when scores would change
FIRST_LOOK = 1 / 16  # share of each task in the first chunk(s): racing's first look
MIN_LOOK_EXAMPLES = 32  # examples of each task seen at the first look, at least


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

    races = True  # pruning.scoring.ConfigEvaluator: evaluate_many takes a Race

    def with_batch_size(self, batch_size: int) -> Evaluator:
        """The same evaluator with `batch_size` rows per batch (pruning.scoring.ConfigEvaluator)."""
        other = self._like(self.tasks, batch_size)
        other.observer = self.observer
        return other

    def with_tasks(self, tasks: list[Task]) -> Evaluator:
        """An evaluator of `tasks` with this one's options (batch size, memory budget, compile, attention)."""
        return self._like(tasks, self.batch_size)

    def _like(self, tasks: list[Task], batch_size: int) -> Evaluator:
        budget_gb = self.chunk_budget / 2**30
        return Evaluator(
            self.loaded, tasks, batch_size, self.max_length, budget_gb, self.shared_context, self.compiled, self.flex
        )

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
