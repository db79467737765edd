"""Summed log-probabilities of every request's continuation, over prepared batches.

Logits are computed only at the scored positions; packed rows attend through a dense 4D mask or
flex_attention block masks (`pruning.compile`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pruning.compile import attention, packed_block_mask
from pruning.packing import PreparedTask, packed_attention_mask

_LOGPROB_CHUNK = 2**26  # logits converted to float32 at a time


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
