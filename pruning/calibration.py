"""The calibration corpus of Taylor importance, and its seeded token windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pruning.models import ModelError


def calibration_text(source: str = "pydoc") -> str:
    """The calibration corpus: `pydoc` (Python's own topic docs), a .txt file, a .jsonl file,
    or a hub dataset `hf:<name>[:<config>]` (its train split).

    A .jsonl record or dataset row contributes its "text" field, or else its first string field.
    """
    if source == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    if source.startswith("hf:"):
        return _hub_text(source)
    path = Path(source)
    if path.suffix not in (".txt", ".jsonl"):
        raise ModelError(
            f"unknown calibration source {source!r}; allowed: pydoc, a .txt file, a .jsonl file, hf:<dataset>[:<config>]"
        )
    if not path.is_file():
        raise ModelError(f"calibration file not found: {source!r}")
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ModelError(f"{source}:{number}: not a JSON line") from None
        strings = [v for v in record.values() if isinstance(v, str)] if isinstance(record, dict) else []
        if not strings:
            raise ModelError(f"{source}:{number}: no string field")
        texts.append(record["text"] if isinstance(record.get("text"), str) else strings[0])
    return "\n\n".join(texts)


def _hub_text(source: str) -> str:
    import datasets

    name, _, config = source.removeprefix("hf:").partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train")
    except Exception as err:  # offline, unknown name, missing config
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"cannot load calibration dataset {source!r}: {first}") from None
    column = (
        "text"
        if "text" in rows.column_names
        else next((c for c, f in rows.features.items() if getattr(f, "dtype", None) == "string"), None)
    )
    if column is None:
        raise ModelError(f"calibration dataset {source!r} has no text column")
    return "\n\n".join(t for t in rows[column] if t and t.strip())


def calibration_batches(
    tokenizer,
    source: str = "pydoc",
    seq_len: int = 64,
    num_samples: int = 128,
    seed: int = 0,
    batch_size: int = 8,
    max_len: int | None = None,
    text: str | None = None,
) -> list[torch.Tensor]:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets of the tokenized corpus
    (`source`, or `text` itself when given).

    Returns LongTensor batches of shape [<= batch_size, seq_len]. `max_len` is the model's
    context length (`max_position_embeddings`); longer windows are refused.
    """
    if num_samples < 1:
        raise ModelError(f"num_samples {num_samples} out of range; allowed: >= 1")
    if batch_size < 1:
        raise ModelError(f"batch_size {batch_size} out of range; allowed: >= 1")
    if seq_len < 1 or (max_len is not None and seq_len > max_len):
        limit = f"1..{max_len} (the model's context)" if max_len is not None else ">= 1"
        raise ModelError(f"seq_len {seq_len} out of range; allowed: {limit}")
    ids = tokenizer(calibration_text(source) if text is None else text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < seq_len + 1:
        raise ModelError(f"calibration corpus {source!r} has {len(ids)} tokens; seq_len {seq_len} needs at least {seq_len + 1}")
    tokens = torch.tensor(ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (num_samples,), generator=generator)
    windows = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
    return list(windows.split(batch_size))
