"""Write a model without a configuration of units (pruning.units) as a directory users load with transformers,
and measure what its KV cache holds.

Whole blocks only: a plain config (pruning.models.save_without_blocks). With attention or MLP sublayers,
which no family's config can express: the blocks are removed as for a plain config, the removed
sublayers' modules (pruning.families' branches) leave the weights, and the directory ships
pruning/modeling_prunetrack.py with the family's classes filled in, named in config.json's `auto_map`
(as LLM-Drop's checkpoints do), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
loads it without prunetrack, and its KV cache holds the kept attention sublayers only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from pruning import modeling_prunetrack
from pruning.families import FamilyError, branches_of
from pruning.models import LoadedModel, _get_attr_path, blocks_removed, save_without_blocks
from pruning.units import ATTENTION, Config, check_config, removed_blocks

MODELING_FILE = Path(modeling_prunetrack.__file__).name
_FAMILY_IMPORT = re.compile(r"^from transformers import Llama(\w+) as Family(\w+)  # FAMILY$", re.M)


def save_without_units(loaded: LoadedModel, units, directory) -> Config:
    """Write the model without `units` to `directory` (weights, config, tokenizer; with sublayers also the
    modeling code). `loaded` is unchanged. Returns the checked, normalized configuration."""
    config = check_config(units, loaded.num_blocks)
    blocks = removed_blocks(config)
    sublayers = [u for u in config if not u.is_block]
    if not sublayers:
        save_without_blocks(loaded, blocks, directory)
        return config
    branches = branches_of(loaded.model)
    family_class, family_config = type(loaded.model), type(loaded.model.config)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(family_config.model_type)
    if causal_lm != family_class.__name__ or getattr(transformers, causal_lm) is not family_class:
        raise FamilyError(
            f"sublayer export supports transformers' causal LMs; {family_class.__name__} is not one: "
            "export whole blocks (blocks=...) instead"
        )
    kept = [b for b in range(loaded.num_blocks) if b not in blocks]
    removed = {}  # module path in the exported model -> RemovedBranch's arguments
    for unit in sublayers:
        for path in branches.of(unit.kind):
            module = _get_attr_path(loaded.blocks[unit.block], path)
            width = module.out_features if isinstance(module, nn.Linear) else None
            removed[f"{loaded.blocks_path}.{kept.index(unit.block)}.{path}"] = {
                "attention": unit.kind == ATTENTION,
                "width": width,
            }
    directory = Path(directory)
    with blocks_removed(loaded, blocks):
        gone = tuple(f"{path}." for path in removed)
        weights = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith(gone)}
        loaded.model.save_pretrained(directory, state_dict=weights)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)
    code = Path(modeling_prunetrack.__file__).read_text()
    names = {"Config": family_config.__name__, "ForCausalLM": family_class.__name__}
    code = _FAMILY_IMPORT.sub(lambda m: f"from transformers import {names[m[2]]} as Family{m[2]}  # FAMILY", code)
    (directory / MODELING_FILE).write_text(code)
    config_file = directory / "config.json"
    saved = json.loads(config_file.read_text())
    module = MODELING_FILE.removesuffix(".py")
    saved.update(
        model_type=f"prunetrack_{saved['model_type']}",
        auto_map={"AutoConfig": f"{module}.PrunetrackConfig", "AutoModelForCausalLM": f"{module}.PrunetrackForCausalLM"},
        prunetrack_blocks_path=loaded.blocks_path,
        prunetrack_removed=removed,
    )
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return config


def ships_code(directory) -> bool:
    """Whether `directory` is an export that ships prunetrack's modeling code (loads with trust_remote_code)."""
    return (Path(directory) / MODELING_FILE).is_file()


@torch.inference_mode()
def kv_cache_bytes_per_token(model: nn.Module, ids: torch.Tensor) -> float:
    """Bytes the model's KV cache holds per token after one prefill of `ids` (batch x length): the keys
    and values of every cache layer, over batch x length (sliding-window layers keep at most their window)."""
    cache = model(input_ids=ids, use_cache=True).past_key_values
    held = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if t is not None
    )
    return held / ids.numel()
