"""Where a block's attention and MLP residual branches live, per model family, and running a model
with a configuration of units (pruning.units: blocks, attention or MLP sublayers) removed in place.

A removed sublayer makes its residual branch contribute nothing: its modules are swapped for
`ZeroBranch`, which returns zeros in the branch's output structure, so the block's output is its
input plus the other branch. A norm applied to the branch's output (Gemma 2/3's post-norms,
Molmo2's `norm_after`) maps zeros to zeros, so no family needs more than the module swap.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from torch import nn

from pruning.models import LoadedModel, ModelError, _get_attr_path, blocks_removed
from pruning.units import ATTENTION, Config, Unit, check_config, removed_blocks


class FamilyError(ModelError):
    """A model family whose blocks' attention and MLP branches prunetrack does not know."""


@dataclass(frozen=True)
class Branches:
    """Dotted paths, inside one block, of the modules of its attention branch and of its MLP branch;
    swapping all of a branch's modules for zeros removes the branch (OPT's MLP is its fc1 and fc2)."""

    attention: tuple[str, ...]
    mlp: tuple[str, ...]

    def of(self, kind: str) -> tuple[str, ...]:
        """The module paths of sublayer `kind` (pruning.units.ATTENTION or MLP)."""
        return self.attention if kind == ATTENTION else self.mlp


_LLAMA_LIKE = Branches(("self_attn",), ("mlp",))
# Per family (the model_type of the model's text config, so VLMs go by their language model).
FAMILIES = {
    "llama": _LLAMA_LIKE,  # also the language model of Llava, Idefics3, SmolVLM
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,  # post-norms on both branches' outputs
    "gemma3_text": _LLAMA_LIKE,  # Gemma 3, also the language model of its VLM
    "phi3": _LLAMA_LIKE,
    "qwen2_vl_text": _LLAMA_LIKE,
    "qwen2_5_vl_text": _LLAMA_LIKE,
    "qwen3_vl_text": _LLAMA_LIKE,
    "molmo2_text": _LLAMA_LIKE,
    "gpt2": Branches(("attn",), ("mlp",)),
    "gpt_neox": Branches(("attention",), ("mlp",)),  # parallel residual or not
    "opt": Branches(("self_attn",), ("fc1", "fc2")),  # the MLP is inline in the block
}


def family_of(model: nn.Module) -> str:
    """The model's family: its text config's model_type (a VLM's language model)."""
    return model.config.get_text_config(decoder=True).model_type


def branches_of(model: nn.Module) -> Branches:
    """Where attention and MLP live in the model's blocks; FamilyError for a family without an adapter
    or whose blocks normalize after the residual sum (OPT-350m), where no branch removal is exact."""
    family = family_of(model)
    if family not in FAMILIES:
        raise FamilyError(f"sublayer removal does not support model family {family!r}; supported: {', '.join(sorted(FAMILIES))}")
    if getattr(model.config.get_text_config(decoder=True), "do_layer_norm_before", True) is False:
        raise FamilyError(f"sublayer removal needs pre-norm blocks; this {family} model normalizes after the residual sum")
    return FAMILIES[family]


class ZeroBranch(nn.Module):
    """Stands in for a removed branch module: zeros shaped like its output (`width` features, or the
    input's), as a (zeros, None) pair where the module returns (output, weights) (attention).

    As an attention it keeps the layer's slot in a dynamic KV cache filled with a one-number-wide
    placeholder per token, so that the cache's length, read from the first layer, stays right."""

    def __init__(self, width: int | None, as_tuple: bool, layer_idx: int | None = None):
        super().__init__()
        self.width, self.as_tuple = width, as_tuple
        if layer_idx is not None:
            self.layer_idx = layer_idx  # renumbered with the blocks (pruning.models.blocks_replaced)

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs["hidden_states"]
        zeros = hidden_states.new_zeros(*hidden_states.shape[:-1], self.width or hidden_states.shape[-1])
        if not self.as_tuple:
            return zeros
        cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
        if cache is not None and getattr(self, "layer_idx", None) is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return zeros, None


def _zero_for(module: nn.Module, attention: bool) -> ZeroBranch:
    width = module.out_features if isinstance(module, nn.Linear) else None
    return ZeroBranch(width, attention, getattr(module, "layer_idx", None) if attention else None)


@contextlib.contextmanager
def sublayers_removed(loaded: LoadedModel, config: Config):
    """Run the model with the sublayer units of `config` (a normalized configuration) zeroed; whole
    blocks in it are left alone. Everything is restored on exit."""
    sublayers = [u for u in config if not u.is_block]
    branches = branches_of(loaded.model) if sublayers else None
    swapped = []  # (parent, attribute, original module)
    try:
        for unit in sublayers:
            block = loaded.blocks[unit.block]
            for path in branches.of(unit.kind):
                parent_path, _, attr = path.rpartition(".")
                parent = _get_attr_path(block, parent_path) if parent_path else block
                original = getattr(parent, attr)
                swapped.append((parent, attr, original))
                setattr(parent, attr, _zero_for(original, unit.kind == ATTENTION))
        yield loaded
    finally:
        for parent, attr, original in reversed(swapped):
            setattr(parent, attr, original)


@contextlib.contextmanager
def units_removed(loaded: LoadedModel, units, what: str = "units"):
    """Run the model with `units` (Units, `a4`/`m4`/`b4` names or block indices) removed in place:
    whole blocks leave the block list (pruning.models.blocks_removed), a removed sublayer's branch
    contributes nothing. Checked with pruning.units.check_config (UnitError); restored on exit."""
    config = check_config(units, loaded.num_blocks, what)
    with sublayers_removed(loaded, config), blocks_removed(loaded, removed_blocks(config)):
        yield loaded


def unit_parameters(loaded: LoadedModel, unit: Unit) -> int:
    """Parameters a unit removes: its block's, or its branch modules' (norms stay with the block)."""
    block = loaded.blocks[unit.block]
    if unit.is_block:
        return sum(p.numel() for p in block.parameters())
    modules = [_get_attr_path(block, path) for path in branches_of(loaded.model).of(unit.kind)]
    return sum(p.numel() for m in modules for p in m.parameters())


def removed_parameters(loaded: LoadedModel, config: Config) -> int:
    """Parameters a normalized configuration removes."""
    return sum(unit_parameters(loaded, u) for u in config)
