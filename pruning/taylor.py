"""Taylor-importance global structured width pruning (in the spirit of LLM-Pruner).

Structural groups, per transformer block:

* attention: one group per KV head = its k_proj/v_proj rows, the q_proj rows of the query
  heads that share it (GQA) and the o_proj columns of those query heads (plus q/k/v bias
  entries where present, as in Qwen2);
* MLP: one group per intermediate channel = a gate_proj row, an up_proj row and a
  down_proj column (plus gate/up bias entries where present).

The prunable parameters of a block are the parameters that belong to some group.
Whole KV groups are removed, so `head_dim` and `num_key_value_groups` never change. The
calibration windows come from `pruning.calibration`, the slicing of the layers from `pruning.slicing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pruning.models import ModelError, find_blocks_path
from pruning.slicing import _layer_shape, _slice_block

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
NORMALIZATIONS = ("none", "max", "sum", "mean", "standardize")
_EPS = 1e-12  # floor for denominators in ratios and normalisations


# --------------------------------------------------------------------------- importance


@dataclass
class LayerGroups:
    """Importance of one block's groups."""

    head_importance: torch.Tensor  # [num_key_value_heads]
    channel_importance: torch.Tensor  # [intermediate_size]


@dataclass
class GradStats:
    """Statistics of one block's accumulated gradients over its prunable Linear weights."""

    norm: float
    mean_abs: float
    std: float  # population std of the gradient elements
    max_abs: float


def check_family(model: nn.Module) -> None:
    """Refuse a model whose family the width pruner cannot slice (one-line ModelError)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ModelError(f"model type {model_type!r} not supported for width pruning; supported: {', '.join(SUPPORTED_FAMILIES)}")


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(find_blocks_path(model))


def _projections(block: nn.Module) -> dict[str, nn.Linear]:
    attn, mlp = block.self_attn, block.mlp
    return {
        "q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
        "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj,
    }  # fmt: skip


def _grouped(name: str, linear: nn.Linear) -> list[nn.Parameter]:
    """A projection's parameters that belong to groups: the weight, and the bias unless it is o's or down's."""
    has_bias = linear.bias is not None and name not in ("o", "down")
    return [linear.weight, linear.bias] if has_bias else [linear.weight]


def _tracked(block: nn.Module) -> list[nn.Parameter]:
    """The block's parameters that belong to groups."""
    return [param for name, linear in _projections(block).items() for param in _grouped(name, linear)]


def _element_scores(param: nn.Parameter, fisher: dict, order: str) -> torch.Tensor:
    w, g = param.detach().float(), param.grad.float()
    if order == "first":
        return (w * g).abs()
    return (w * g - 0.5 * w * w * fisher[param].float()).abs()


def _group_scores(block: nn.Module, fisher: dict, order: str) -> LayerGroups:
    attn = block.self_attn
    p = _projections(block)
    d, rep = attn.head_dim, attn.num_key_value_groups
    n_kv = p["k"].out_features // d
    s = {name: _element_scores(linear.weight, fisher, order) for name, linear in p.items()}
    heads = (
        s["q"].reshape(n_kv, -1).sum(1)
        + s["k"].reshape(n_kv, -1).sum(1)
        + s["v"].reshape(n_kv, -1).sum(1)
        + s["o"].reshape(-1, n_kv, rep * d).sum((0, 2))
    )
    channels = s["gate"].sum(1) + s["up"].sum(1) + s["down"].sum(0)
    for name in ("q", "k", "v", "gate", "up"):
        if p[name].bias is not None:
            bias = _element_scores(p[name].bias, fisher, order)
            if name in ("gate", "up"):
                channels = channels + bias
            else:
                heads = heads + bias.reshape(n_kv, -1).sum(1)
    return LayerGroups(heads.cpu(), channels.cpu())


def _grad_stats(block: nn.Module) -> GradStats:
    grads = [linear.weight.grad.float() for linear in _projections(block).values()]
    n = sum(g.numel() for g in grads)
    total = sum(g.sum(dtype=torch.float64).item() for g in grads)
    squares = sum(g.pow(2).sum(dtype=torch.float64).item() for g in grads)
    abs_total = sum(g.abs().sum(dtype=torch.float64).item() for g in grads)
    mean = total / n
    return GradStats(
        norm=math.sqrt(squares),
        mean_abs=abs_total / n,
        std=math.sqrt(max(squares / n - mean * mean, 0.0)),
        max_abs=max(g.abs().max().item() for g in grads),
    )


def _accumulate_square(acc: torch.Tensor, grad: torch.Tensor) -> None:
    """Gradient hook: add this backward's gradient squared (returns None: .grad is untouched)."""
    acc.add_(grad.float().pow(2))


def taylor_importance(model: nn.Module, batches, *, order: str = "first") -> tuple[list[LayerGroups], list[GradStats]]:
    """Group importances and per-block gradient statistics from calibration batches.

    For each batch: forward with labels = input_ids, backward of that batch's mean token
    loss; gradients add up in `.grad`, so the accumulated gradient g is the gradient of the
    SUM of the per-batch mean losses, and memory is bounded by one batch. Only the grouped
    block parameters get gradients.

    Element importance: order="first" is |w * g|; order="second" is
    |w * g - 0.5 * w^2 * F| with F = sum over batches of the squared per-batch gradient, the
    empirical-Fisher approximation of the Hessian diagonal (LLM-Pruner's "param_mix", with
    per-batch rather than per-sample gradients). A group's importance is the sum over its
    elements. The model runs in eval mode (dropout off); gradients are cleared and the
    requires_grad flags and training mode restored afterwards.
    """
    if order not in ("first", "second"):
        raise ModelError(f"unknown Taylor order {order!r}; allowed: first, second")
    check_family(model)
    batches = list(batches)
    if not batches:
        raise ModelError("no calibration batches")
    blocks = _blocks(model)
    tracked = [p for block in blocks for p in _tracked(block)]
    tracked_ids = {id(p) for p in tracked}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    fisher: dict[nn.Parameter, torch.Tensor] = {}
    hooks = []
    device = next(model.parameters()).device
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in tracked_ids)
            p.grad = None
        if order == "second":
            for p in tracked:
                fisher[p] = torch.zeros_like(p, dtype=torch.float32)
                hooks.append(p.register_hook(partial(_accumulate_square, fisher[p])))
        for batch in batches:
            batch = batch.to(device)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        groups = [_group_scores(block, fisher, order) for block in blocks]
        stats = [_grad_stats(block) for block in blocks]
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in saved_flags:
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    return groups, stats


def gradient_summary(stats: list[GradStats]) -> dict[str, float]:
    """Cross-layer gradient imbalance: max/min ratios and max-min ranges of the block stats.

    Ratios divide by max(min, 1e-12) so they stay finite (MLflow cannot log inf).
    """
    if not stats:
        raise ModelError("no gradient statistics to summarise")

    def ratio(values: list[float]) -> float:
        return max(values) / max(min(values), _EPS)

    norms = [s.norm for s in stats]
    means = [s.mean_abs for s in stats]
    return {
        "grad_norm_ratio": ratio(norms),
        "grad_mean_ratio": ratio(means),
        "grad_std_ratio": ratio([s.std for s in stats]),
        "grad_max_ratio": ratio([s.max_abs for s in stats]),
        "grad_mean_range": max(means) - min(means),
        "grad_norm_range": max(norms) - min(norms),
    }


# --------------------------------------------------------------------------- pruning


@dataclass
class PruneReport:
    """What `global_prune` removed."""

    layer_rates: list[float]  # fraction of each block's prunable params removed
    heads_kept: list[int]  # KV groups kept per block
    channels_kept: list[int]
    n_params_before: int  # whole model
    n_params_after: int
    pruned_fraction: float  # of the prunable params
    extreme_pruning_layers: int  # blocks with rate > extreme_threshold


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _group_sizes(block: nn.Module) -> tuple[int, int, int, int]:
    """(KV groups, params per KV group, channels, params per channel) of a block."""
    p = _projections(block)
    numel = {name: sum(param.numel() for param in _grouped(name, linear)) for name, linear in p.items()}
    n_kv = p["k"].out_features // block.self_attn.head_dim
    channels = p["gate"].out_features
    head_params = (numel["q"] + numel["k"] + numel["v"] + numel["o"]) // n_kv
    return n_kv, head_params, channels, (numel["gate"] + numel["up"] + numel["down"]) // channels


def _normalize(scores: torch.Tensor, method: str) -> torch.Tensor:
    if method == "none":
        return scores
    if method == "standardize":
        return (scores - scores.mean()) / max(scores.std(unbiased=False).item(), _EPS)
    scale = {"max": scores.max, "sum": scores.sum, "mean": scores.mean}[method]().item()
    return scores / max(scale, _EPS)


def check_prune_options(
    ratio: float, normalization: str = "none", max_layer_rate: float = 1.0, min_heads: int = 1, min_channels: int = 1
) -> None:
    """Validate `global_prune`'s options without touching a model (so callers can fail before compute)."""
    if not 0 < ratio < 1:
        raise ModelError(f"pruning_ratio {ratio} out of range; allowed: 0 < ratio < 1")
    if normalization not in NORMALIZATIONS:
        raise ModelError(f"unknown normalization {normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")
    if not 0 < max_layer_rate <= 1:
        raise ModelError(f"max_layer_rate {max_layer_rate} out of range; allowed: 0 < rate <= 1")
    if min_heads < 1 or min_channels < 1:
        raise ModelError(f"min_heads {min_heads} / min_channels {min_channels} out of range; allowed: >= 1")


def global_prune(
    model: nn.Module,
    groups: list[LayerGroups],
    ratio: float,
    *,
    normalization: str = "none",
    protect_first_last: bool = False,
    max_layer_rate: float = 1.0,
    extreme_threshold: float = 0.8,
    min_heads: int = 1,
    min_channels: int = 1,
) -> PruneReport:
    """Remove the globally least important groups until `ratio` of the prunable params is gone.

    Score of a group = importance / its parameter count (a KV group is much larger than a
    channel), then optionally normalised per block, heads and channels separately: "max",
    "sum", "mean" divide by the block's max/sum/mean, "standardize" takes z-scores. Groups
    are removed greedily from the lowest score; a group is skipped when its block is
    protected (blocks 0 and L-1 with `protect_first_last`), when removing it would push the
    block past `max_layer_rate`, or below `min_heads` / `min_channels`. The stop comes at
    the first group that reaches the target, so the overshoot is less than one group.
    The layers are then sliced physically and their sizes stored in
    `config.prunetrack_layers`.
    """
    check_prune_options(ratio, normalization, max_layer_rate, min_heads, min_channels)
    check_family(model)
    blocks = _blocks(model)
    if len(groups) != len(blocks):
        raise ModelError(f"got importances for {len(groups)} blocks; the model has {len(blocks)}")

    n_before = count_parameters(model)
    sizes = [_group_sizes(block) for block in blocks]
    prunable = [n_kv * hp + ch * cp for n_kv, hp, ch, cp in sizes]
    protected = (0, len(blocks) - 1) if protect_first_last else ()
    candidates = _candidates(groups, sizes, normalization, protected)
    removed, drop_heads, drop_channels = _drops(
        candidates, sizes, prunable, ratio * sum(prunable), max_layer_rate, min_heads, min_channels
    )
    total_removed = sum(removed)

    for b, block in enumerate(blocks):
        keep_heads = [i for i in range(sizes[b][0]) if i not in drop_heads[b]]
        keep_channels = [i for i in range(sizes[b][2]) if i not in drop_channels[b]]
        _slice_block(block, keep_heads, keep_channels)
    model.config.prunetrack_layers = [_layer_shape(block) for block in blocks]

    rates = [r / p for r, p in zip(removed, prunable)]
    return PruneReport(
        layer_rates=rates,
        heads_kept=[n_kv - len(d) for (n_kv, *_), d in zip(sizes, drop_heads)],
        channels_kept=[ch - len(d) for (_, _, ch, _), d in zip(sizes, drop_channels)],
        n_params_before=n_before,
        n_params_after=count_parameters(model),
        pruned_fraction=total_removed / sum(prunable),
        extreme_pruning_layers=sum(r > extreme_threshold for r in rates),
    )


def _candidates(groups: list[LayerGroups], sizes: list[tuple], normalization: str, protected: tuple) -> list[tuple]:
    """Every group of the blocks not `protected`, as (score, block, is_head, index, params), lowest score first."""
    candidates = []
    for b, (layer, (n_kv, hp, ch, cp)) in enumerate(zip(groups, sizes)):
        if layer.head_importance.numel() != n_kv or layer.channel_importance.numel() != ch:
            raise ModelError(f"block {b}: importances do not match its {n_kv} KV groups and {ch} channels")
        if b in protected:
            continue
        heads = _normalize(layer.head_importance.double() / hp, normalization)
        channels = _normalize(layer.channel_importance.double() / cp, normalization)
        candidates += [(s, b, True, i, hp) for i, s in enumerate(heads.tolist())]
        candidates += [(s, b, False, i, cp) for i, s in enumerate(channels.tolist())]
    candidates.sort(key=lambda c: c[0])
    return candidates


def _drops(
    candidates: list[tuple],
    sizes: list[tuple],
    prunable: list[int],
    target: float,
    max_layer_rate: float,
    min_heads: int,
    min_channels: int,
) -> tuple[list[int], list[set[int]], list[set[int]]]:
    """Groups removed greedily from the lowest score until `target` params are gone: per block,
    the params removed, and the KV groups and channels dropped."""
    removed, total_removed = [0] * len(sizes), 0
    drop_heads: list[set[int]] = [set() for _ in sizes]
    drop_channels: list[set[int]] = [set() for _ in sizes]
    for _, b, is_head, index, params in candidates:
        if total_removed >= target:
            break
        dropped, keep_min, total = (
            (drop_heads[b], min_heads, sizes[b][0]) if is_head else (drop_channels[b], min_channels, sizes[b][2])
        )
        if total - len(dropped) - 1 < keep_min or removed[b] + params > max_layer_rate * prunable[b]:
            continue
        dropped.add(index)
        removed[b] += params
        total_removed += params
    return removed, drop_heads, drop_channels


# --------------------------------------------------------------------------- save / load


def save_pruned(model: nn.Module, tokenizer, directory) -> None:
    """Write safetensors weights, config.json (with `prunetrack_layers`) and the tokenizer files."""
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_pruned(directory) -> nn.Module:
    """Rebuild a model saved by `save_pruned`: full size from config, sliced to the stored shapes, weights loaded."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config)
    blocks = _blocks(model)
    shapes = getattr(config, "prunetrack_layers", None) or []
    if len(shapes) != len(blocks):
        raise ModelError(f"{directory}: config.json has no prunetrack_layers for its {len(blocks)} blocks")
    for block, shape in zip(blocks, shapes):
        _slice_block(block, list(range(shape["num_key_value_heads"])), list(range(shape["intermediate_size"])))
    state = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if unexpected or set(missing) - tied:
        raise ModelError(f"{directory}: weights do not match the pruned shapes (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.eval()
