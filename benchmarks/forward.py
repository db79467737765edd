"""Benchmark part 3 (CUDA): forward throughput and MFU of a random Llama-3-8B-shaped model, plain
transformers against our scorer."""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import LLAMA3_8B, _timed, flops_per_token, peak_flops
from pruning.evaluate import Evaluator
from pruning.models import LoadedModel, find_blocks_path
from pruning.tasks import Document, Task


def word_tokenizer(vocab_size: int):
    """A tokenizer whose words `w1` ... `w<vocab_size-1>` are token ids 1 ...; `<s>` (0) is BOS/EOS/pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<s>", pad_token="<s>", unk_token="<s>")


def bench_forward(
    device: torch.device,
    shape: dict = LLAMA3_8B,
    batch_size: int = 8,
    seq_len: int = 1024,
    n_batches: int = 8,
    repeats: int = 3,
    peak_tflops: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Forward throughput and MFU, plain transformers and our scorer; the baseline and the middle
    block's removal step-wide against each alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    loaded = LoadedModel(model, word_tokenizer(config.vocab_size), "random-llama", "random", find_blocks_path(model))
    task = _random_words(config.vocab_size, batch_size * n_batches, seq_len)
    ours = Evaluator(loaded, [task], batch_size=batch_size, max_length=seq_len, chunk_budget_gb=64)
    tokens = sum(c.prepared.n_tokens for c in ours.chunks)
    assert tokens == batch_size * n_batches * seq_len

    @torch.no_grad()
    def plain():
        for chunk in ours.chunks:
            for batch in chunk.prepared.batches:
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)

    plain()  # warm-up
    ours.evaluate(())
    seconds = _alternating({"plain": plain, "ours": lambda: ours.evaluate(())}, repeats)
    middle = (config.num_hidden_layers // 2,)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pair_seconds = _timed(lambda: ours.evaluate_many([(), middle]))[1]
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    alone_seconds = _timed(lambda: (ours.evaluate(()), ours.evaluate(middle)))[1]
    per_token, peak = flops_per_token(model, seq_len), peak_flops(device, peak_tflops)
    out = {
        "shape": {"family": "llama", **shape},
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_pass": tokens,
        "repeats": repeats,
        "gflop_per_token": per_token / 1e9,
        "peak_tflops": peak / 1e12 if peak else None,
        "kept_on": str(ours.storage_device()),
        "peak_memory_mb": peak_memory,
        "stepwide_speedup_baseline_and_middle_block": alone_seconds / pair_seconds,
    }
    for key, values in seconds.items():
        rate = tokens / statistics.median(values)
        out[key] = {"tokens_per_s": rate, "tflops": rate * per_token / 1e12, "mfu": rate * per_token / peak if peak else None}
    out["ours_vs_plain"] = out["ours"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    return out


def _alternating(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of `runs` over `repeats` rounds, the order swapped every round."""
    keys = tuple(runs)
    seconds = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys[r % 2 :] + keys[: r % 2]:
            seconds[key].append(_timed(runs[key])[1])
    return seconds


def _random_words(vocab_size: int, n: int, seq_len: int) -> Task:
    """`n` documents of `seq_len` seeded random words of `word_tokenizer(vocab_size)`."""
    words = torch.randint(1, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))
    return Task(
        "random_tokens",
        "validation",
        "perplexity",
        [Document(i, " ".join(f"w{t}" for t in row)) for i, row in enumerate(words.tolist())],
        source="generated",
    )
