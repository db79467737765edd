"""Modeling code shipped inside a prunetrack export whose blocks lost attention or MLP sublayers.

pruning.export_units copies this file next to the weights, with the family's classes filled in on the two
FAMILY lines, and names it in config.json's `auto_map`, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads the model with only torch and
transformers installed. The config's `prunetrack_removed` maps each removed branch module (a dotted path
in the model: an attention, an MLP, OPT's fc1 and fc2) to a RemovedBranch, which adds zeros to the residual
stream and has no weights; a removed attention keeps no KV cache. The kept attention sublayers are
numbered 0, 1, ... in the cache, each with its block's attention type (full or sliding window).

This file imports nothing from prunetrack.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn
from transformers import DynamicCache
from transformers import LlamaConfig as FamilyConfig  # FAMILY
from transformers import LlamaForCausalLM as FamilyForCausalLM  # FAMILY


class RemovedBranch(nn.Module):
    """A removed residual branch module: zeros shaped like its output (`width` features, or the input's),
    so the block adds nothing. As an attention it returns (zeros, None), like attention modules, and
    never touches the KV cache."""

    def __init__(self, attention: bool, width: int | None = None):
        super().__init__()
        self.attention, self.width = attention, width

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs["hidden_states"]
        zeros = hidden_states.new_zeros(*hidden_states.shape[:-1], self.width or hidden_states.shape[-1])
        return (zeros, None) if self.attention else zeros


def replace_modules(model: nn.Module, removed: dict[str, dict]) -> None:
    """Swap each module named in `removed` (dotted path -> RemovedBranch's arguments) for a RemovedBranch."""
    for path, branch in removed.items():
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, RemovedBranch(**branch))


def attention_blocks(model: nn.Module, blocks_path: str, removed: dict[str, dict]) -> list[int]:
    """The blocks that keep their attention, in order (their KV-cache layers are 0, 1, ...)."""
    gone = {int(path[len(blocks_path) + 1 :].split(".")[0]) for path, branch in removed.items() if branch["attention"]}
    return [i for i in range(len(model.get_submodule(blocks_path))) if i not in gone]


def renumber_attention(model: nn.Module, blocks_path: str, kept: list[int]) -> None:
    """Give the modules of the blocks in `kept` the KV-cache index of their block's position in `kept`."""
    blocks = model.get_submodule(blocks_path)
    for index, block in enumerate(kept):
        for module in blocks[block].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


def compact_cache(cache, kept: list[int], num_blocks: int):
    """A cache made for every block (by generate, or DynamicCache(config=...)) keeps only the layers of
    the blocks in `kept`, each of its block's type; any other cache is returned as it is."""
    if cache is not None and len(kept) < num_blocks and len(getattr(cache, "layers", ())) == num_blocks:
        if cache.get_seq_length():
            raise ValueError("a cache that already holds keys for every block cannot serve a model without some attention")
        cache.layers = [cache.layers[i] for i in kept]
    return cache


class PrunetrackConfig(FamilyConfig):
    """The family's config, under its own model type so that loading without this code fails loudly."""

    model_type = f"prunetrack_{FamilyConfig.model_type}"


class PrunetrackForCausalLM(FamilyForCausalLM):
    """The family's model without the sublayers in `config.prunetrack_removed`; its KV cache holds the
    kept attention sublayers only."""

    config_class = PrunetrackConfig

    def __init__(self, config):
        super().__init__(config)
        removed = dict(config.prunetrack_removed)
        self._blocks_path = config.prunetrack_blocks_path
        replace_modules(self, removed)
        self._kept_attention = attention_blocks(self, self._blocks_path, removed)
        renumber_attention(self, self._blocks_path, self._kept_attention)

    @functools.wraps(FamilyForCausalLM.forward)
    def forward(self, *args, **kwargs):
        call = _FORWARD.bind(self, *args, **kwargs)
        cache = call.arguments.get("past_key_values")
        use_cache = call.arguments.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else self.config.get_text_config(decoder=True).use_cache):
            cache = DynamicCache(config=self.config)
        num_blocks = len(self.get_submodule(self._blocks_path))
        call.arguments["past_key_values"] = compact_cache(cache, self._kept_attention, num_blocks)
        return super().forward(*call.args[1:], **call.kwargs)


_FORWARD = inspect.signature(FamilyForCausalLM.forward)
