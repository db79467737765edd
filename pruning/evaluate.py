"""Batched log-likelihood scoring: multiple-choice accuracy and perplexity, per example.

Requests are tokenized exactly as lm-eval-harness's HF model class does (trailing context
spaces move to the continuation, the continuation is the tail of the whole encoding, an
empty context is replaced by the BOS/EOS token), documents are cut into lm-eval's rolling
windows, and `acc` / `acc_norm` follow lm-eval's definitions: argmax of the summed
log-likelihood, and of the log-likelihood divided by the choice's character length.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pruning.tasks import Task

SCORER_VERSION = "1"  # part of every configuration hash: bump when scores would change
DEFAULT_MAX_LENGTH = 2048


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
    """Right-padded token ids and, per request, where its continuation lies."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    request_index: list[int]
    spans: list[tuple[int, int]]  # [start, end) of the continuation's target positions
    targets: list[torch.Tensor]


@dataclass
class PreparedTask:
    """A task tokenized and batched once, ready to be scored under many configurations."""

    task: Task
    batches: list[Batch]
    n_requests: int
    groups: list[list[int]]  # request indices per example
    target_lengths: list[int]  # scored tokens per request
    n_tokens: int  # tokens fed to the model per scoring pass


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
    """Disjoint prediction windows over a document, as lm-eval's loglikelihood_rolling cuts them."""
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
            new = rolling_windows(tokenizer.encode(example.text, add_special_tokens=False), prefix_token_id(tokenizer), max_length)
        groups.append(list(range(len(pairs), len(pairs) + len(new))))
        pairs.extend(new)
    return pairs, groups


def prepare(task: Task, tokenizer, batch_size: int, max_length: int, pad_id: int) -> PreparedTask:
    """Tokenize `task` and batch its requests, longest first, as lm-eval orders them."""
    pairs, groups = _pairs_of(task, tokenizer, max_length)
    full = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: (-len(full[i]) - 1, i))
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(full[i]) for i in index)
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        spans, targets = [], []
        for row, i in enumerate(index):
            seq, cont = full[i], pairs[i][1]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            spans.append((len(seq) - len(cont), len(seq)))
            targets.append(torch.tensor(cont))
        batches.append(Batch(ids, mask, index, spans, targets))
    return PreparedTask(task, batches, len(pairs), groups, [len(cont) for _, cont in pairs], sum(len(s) for s in full))


@torch.no_grad()
def loglikelihoods(model: nn.Module, prepared: PreparedTask, progress=None, before_batch=None) -> np.ndarray:
    """Summed log-probability of every request's continuation given its context.

    `before_batch(i)` is called before batch i runs (activation reuse uses it).
    """
    device = next(model.parameters()).device
    out = np.zeros(prepared.n_requests, dtype=np.float64)
    for b, batch in enumerate(prepared.batches):
        if before_batch is not None:
            before_batch(b)
        keep = batch.input_ids.shape[1] - min(start for start, _ in batch.spans)
        logits = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        offset = batch.input_ids.shape[1] - logits.shape[1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, (i, (start, end), target) in enumerate(zip(batch.request_index, batch.spans, batch.targets)):
            picked = logprobs[row, start - offset : end - offset].gather(-1, target.to(device)[:, None])
            out[i] = picked.sum().item()
        if progress is not None:
            progress.update(len(batch.request_index))
    return out


def score(model: nn.Module, prepared: PreparedTask, progress=None, before_batch=None) -> TaskScore:
    """Score a prepared task: acc/acc_norm for multiple choice, perplexity for documents."""
    task = prepared.task
    lls = loglikelihoods(model, prepared, progress, before_batch)
    doc_ids = [ex.doc_id for ex in task.examples]
    if task.kind == "multiple_choice":
        per_choice = [lls[g] for g in prepared.groups]
        correct = [int(np.argmax(ll) == ex.gold) for ll, ex in zip(per_choice, task.examples)]
        correct_norm = [
            int(np.argmax(ll / np.array(ex.choice_lengths)) == ex.gold) for ll, ex in zip(per_choice, task.examples)
        ]
        per_example = {
            "doc_id": doc_ids,
            "acc": correct,
            "acc_norm": correct_norm,
            "loglikelihoods": [ll.tolist() for ll in per_choice],
        }
        metrics = {"acc": float(np.mean(correct)), "acc_norm": float(np.mean(correct_norm))}
        return TaskScore(task.name, task.kind, metrics, per_example)
    nll = [float(-lls[g].sum()) for g in prepared.groups]
    tokens = [sum(prepared.target_lengths[i] for i in g) for g in prepared.groups]
    words = [len(re.split(r"\s+", ex.text)) for ex in task.examples]
    n_bytes = [len(ex.text.encode("utf-8")) for ex in task.examples]
    total = sum(nll)
    metrics = {
        "ppl": math.exp(total / sum(tokens)),
        "word_perplexity": math.exp(total / sum(words)),
        "bits_per_byte": total / sum(n_bytes) / math.log(2),
    }
    per_example = {"doc_id": doc_ids, "nll": nll, "tokens": tokens, "words": words, "bytes": n_bytes}
    return TaskScore(task.name, task.kind, metrics, per_example)



class _Replay(nn.Module):
    """Stands in for the first blocks: returns the stored output of the last of them."""

    def __init__(self, states: dict, block: int, as_tuple: bool):
        super().__init__()
        self.states, self.block, self.as_tuple, self.key = states, block, as_tuple, None

    def forward(self, hidden_states, *args, **kwargs):
        state = self.states[(*self.key, self.block)].to(hidden_states.device, non_blocking=True)
        return (state,) if self.as_tuple else state


class Evaluator:
    """Scores a fixed set of tasks with any set of blocks removed.

    With `reuse`, the first pass of the unpruned model keeps each block's output for every
    batch (in host memory, within `reuse_budget_gb`; when they do not all fit, only every
    s-th block is kept). A configuration whose first removed block is k then starts from the
    kept state closest below k instead of recomputing blocks that are identical to the
    unpruned model's. Batches are the same in both passes, so the scores are the same.
    """

    def __init__(self, loaded, tasks: list[Task], batch_size: int = 8, max_length: int | None = None,
                 reuse: bool = True, reuse_budget_gb: float = 4.0):
        self.loaded = loaded
        max_length = max_length or max_length_of(loaded.model)
        pad = loaded.tokenizer.pad_token_id
        self.prepared = [prepare(t, loaded.tokenizer, batch_size, max_length, pad) for t in tasks]
        self.reuse = reuse and loaded.num_blocks > 1
        self.stride = self._stride(reuse_budget_gb)
        self._states: dict = {}
        self._as_tuple = False
        self._baseline: dict[str, TaskScore] | None = None

    @property
    def n_requests(self) -> int:
        return sum(p.n_requests for p in self.prepared)

    def _stride(self, budget_gb: float) -> int:
        width = self.loaded.model.get_input_embeddings().embedding_dim
        itemsize = next(self.loaded.model.parameters()).element_size()
        per_block = sum(b.input_ids.numel() for p in self.prepared for b in p.batches) * width * itemsize
        return max(1, math.ceil((self.loaded.num_blocks - 1) * per_block / (budget_gb * 2**30)))

    @property
    def stored_blocks(self) -> list[int]:
        """Blocks whose outputs are kept: every `stride`-th, never the last."""
        return list(range(self.stride - 1, self.loaded.num_blocks - 1, self.stride))

    def evaluate(self, removed=(), progress=None) -> dict[str, TaskScore]:
        """Scores per task with `removed` blocks taken out."""
        from pruning.models import blocks_removed, blocks_replaced, check_blocks

        removed = check_blocks(removed, self.loaded.num_blocks)
        if not removed:
            if self.reuse and self._baseline is None:
                self._baseline = self._record(progress)
                return self._baseline
            return self._score_all(progress)
        start = max((j for j in self.stored_blocks if j < removed[0]), default=None) if self.reuse else None
        if start is None:
            with blocks_removed(self.loaded, removed):
                return self._score_all(progress)
        if self._baseline is None:
            self._baseline = self._record(None)
        replay = _Replay(self._states, start, self._as_tuple)
        origins = [start] + [i for i in range(start + 1, self.loaded.num_blocks) if i not in removed]
        modules = [replay] + [self.loaded.blocks[i] for i in origins[1:]]
        with blocks_replaced(self.loaded, modules, origins):
            return self._score_all(progress, replay)

    def _score_all(self, progress, replay: _Replay | None = None) -> dict[str, TaskScore]:
        scores = {}
        for t, prepared in enumerate(self.prepared):
            before = (lambda b, t=t: setattr(replay, "key", (t, b))) if replay is not None else None
            scores[prepared.task.name] = score(self.loaded.model, prepared, progress, before)
        return scores

    def _record(self, progress) -> dict[str, TaskScore]:
        """Score the unpruned model while keeping the outputs of the stored blocks."""
        current = {}

        def keep(block: int):
            def hook(module, args, output):
                self._as_tuple = isinstance(output, tuple)
                state = output[0] if self._as_tuple else output
                self._states[(*current["key"], block)] = state.detach().to("cpu", copy=True)

            return hook

        handles = [self.loaded.blocks[j].register_forward_hook(keep(j)) for j in self.stored_blocks]
        try:
            scores = {}
            for t, prepared in enumerate(self.prepared):
                before = lambda b, t=t: current.__setitem__("key", (t, b))  # noqa: E731
                scores[prepared.task.name] = score(self.loaded.model, prepared, progress, before)
            return scores
        finally:
            for handle in handles:
                handle.remove()
