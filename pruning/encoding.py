"""Requests and documents tokenized exactly as lm-eval-harness's HF model class does.

Trailing context spaces move to the continuation, the continuation is the tail of the whole
encoding, an empty context is replaced by the BOS/EOS token, and documents are cut into lm-eval's
rolling windows (see docs/scoring.md).
"""

from __future__ import annotations

from torch import nn

from pruning.tasks import Task

DEFAULT_MAX_LENGTH = 2048


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
