"""Physical width pruning: a block's Linear layers sliced to the KV groups and MLP channels kept."""

from __future__ import annotations

import torch
from torch import nn


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping the given output rows / input columns (bias follows the rows)."""
    weight, bias = linear.weight.detach(), linear.bias
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach())
    for new_param, old_param in zip(new.parameters(), linear.parameters()):
        new_param.requires_grad_(old_param.requires_grad)
    return new


def _slice_block(block: nn.Module, keep_heads: list[int], keep_channels: list[int]) -> None:
    """Keep only the given KV groups and MLP channels of a block (new Linear modules)."""
    attn, mlp = block.self_attn, block.mlp
    d, rep = attn.head_dim, attn.num_key_value_groups
    device = attn.q_proj.weight.device
    kv_rows = torch.tensor([j * d + i for j in keep_heads for i in range(d)], dtype=torch.long, device=device)
    q_rows = [j * rep * d + i for j in keep_heads for i in range(rep * d)]
    q_rows = torch.tensor(q_rows, dtype=torch.long, device=device)
    channels = torch.tensor(keep_channels, dtype=torch.long, device=device)
    attn.q_proj = _sliced_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _sliced_linear(attn.o_proj, cols=q_rows)
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=channels)
    mlp.up_proj = _sliced_linear(mlp.up_proj, rows=channels)
    mlp.down_proj = _sliced_linear(mlp.down_proj, cols=channels)
    mlp.intermediate_size = len(keep_channels)


def _layer_shape(block: nn.Module) -> dict[str, int]:
    attn = block.self_attn
    n_kv = attn.k_proj.out_features // attn.head_dim
    return {
        "num_attention_heads": n_kv * attn.num_key_value_groups,
        "num_key_value_heads": n_kv,
        "intermediate_size": block.mlp.gate_proj.out_features,
    }
