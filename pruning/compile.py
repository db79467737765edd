"""Faster scoring: the repeated decoder block compiled once ("regional" compilation), and the
block-sparse attention (flex_attention) that packed rows use when the model and device allow it.

- `compile_blocks` compiles one function shared by every block of the model (the block's class
  `forward`, with the block as an argument: with `use_cache=False` every block of a model
  reuses the same compiled code, so a 30-block model compiles once, not 30 times). It is set
  as each block's own `forward`, so the blocks stay the same modules: removing, replacing and
  replaying blocks and forward hooks work as before, outside the compiled code. Only inference
  is compiled: with gradients on (Taylor importance), the blocks run eagerly.
- Shapes: compiled with static shapes (`dynamic=False`: the fastest kernels, and on the CPU,
  inductor's flex_attention template fails to build with dynamic shapes, torch 2.13), so the
  batches are bucketed (`bucketed`): widths padded to 128 x 2^k or 192 x 2^k tokens (at most
  a third is padding), rows to a power of two (only a chunk's last batch has fewer rows); a
  study compiles once per bucket it meets (about ten), not once per batch.
- `flex_reason`: why packed rows cannot use flex_attention's BlockMask on a model (None: they
  can); `attention` switches a model's attention implementation for a scoring pass.

Light to import (the settings use COMPILE_CHOICES before torch is loaded).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

COMPILE_CHOICES = ("auto", "true", "false")
WIDTH_BUCKET = 128  # the narrowest compiled batch, tokens (flex_attention's block size)
FLEX_ROW_TOKENS = 2048  # packed rows hold this many tokens with flex_attention (ROW_TOKENS with the dense mask)
RECOMPILE_LIMIT = 64  # per compiled function: every model and attention path of a process shares the block function


def use_compile(setting: str, device: torch.device) -> bool:
    """Whether scoring compiles the blocks: `setting` is auto (on CUDA), true or false."""
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"unknown compile {setting!r}; allowed: {', '.join(COMPILE_CHOICES)}")
    return device.type == "cuda" if setting == "auto" else setting == "true"


def _block_forward(block: nn.Module, *args, **kwargs):
    return type(block).forward(block, *args, **kwargs)


def _inference_compiled(block: nn.Module, *args, **kwargs):
    import torch

    forward = _block_forward if torch.is_grad_enabled() else _compiled_block_forward()
    return forward(block, *args, **kwargs)


@functools.cache
def _compiled_block_forward():
    """The one compiled block function of the process (its compiled code is cached per shape and model)."""
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(_block_forward, dynamic=False)


def bucketed(rows: int, width: int) -> tuple[int, int]:
    """The (rows, width) a compiled batch of `rows` x `width` tokens is padded to: the next power
    of two rows, and the next width of the form WIDTH_BUCKET x 2^k or 1.5 x WIDTH_BUCKET x 2^k."""
    padded = WIDTH_BUCKET
    while padded < width:
        padded = padded * 3 // 2 if padded & (padded - 1) == 0 else padded * 4 // 3
    return 1 << (rows - 1).bit_length(), padded


def compile_blocks(blocks: nn.ModuleList, compiled: bool = True) -> None:
    """Run `blocks` through the shared compiled block function (or, with `compiled` false, eagerly
    again). In place: the modules, their weights and hooks are unchanged."""
    for block in blocks:
        if compiled:
            block.forward = functools.partial(_inference_compiled, block)
        else:
            block.__dict__.pop("forward", None)


def is_compiled(block: nn.Module) -> bool:
    """Whether `block` runs through the compiled block function."""
    forward = block.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _inference_compiled


def flex_reason(model: nn.Module) -> str | None:
    """Why packed rows cannot use flex_attention block masks on `model`, or None when they can."""
    if not getattr(model, "_supports_flex_attn", False):
        return f"{type(model).__name__} does not support flex_attention"
    if next(model.parameters()).device.type not in ("cuda", "cpu"):
        return f"no flex_attention on {next(model.parameters()).device.type}"
    return None


@contextlib.contextmanager
def attention(model: nn.Module, implementation: str):
    """Run `model` with the attention `implementation` (e.g. flex_attention); restored on exit."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_block_mask(segments: torch.Tensor, prefixes: torch.Tensor):
    """flex_attention BlockMask of packed rows, the same pattern as `packed_attention_mask`: a token
    sees, causally, its own segment and the prefix segment of its example; tiles with nothing to
    see are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q, kv):
        key = segments[b, kv]
        return (kv <= q) & ((key == segments[b, q]) | (key == prefixes[b, q]))

    rows, width = segments.shape
    return create_block_mask(visible, rows, None, width, width, device=segments.device)
