"""Sublayer removal per family (pruning.families): a removed branch contributes exactly nothing."""

import copy

import pytest
import torch
from helpers import tiny_lm

from pruning.families import FAMILIES, FamilyError, branches_of, removed_parameters, sublayers_removed, units_removed
from pruning.models import LoadedModel, blocks_removed, find_blocks_path
from pruning.units import Unit, UnitError, parse_units

# Each family's branch output projections: zeroing their weights and biases is an independent way to
# make the branch contribute nothing (a post-norm maps zeros to zeros).
OUTPUTS = {
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "opt": ("self_attn.out_proj", "fc2"),
}
LLAMA_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")
CASES = [
    ("llama", {}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("gemma", {}),
    ("gemma2", {}),
    ("gemma3_text", {}),
    ("phi3", {}),
    ("gpt2", {}),
    ("gpt_neox", {"use_parallel_residual": True}),
    ("gpt_neox", {"use_parallel_residual": False}),
    ("opt", {}),
]


def loaded_tiny(family: str, layers: int = 5, **config) -> LoadedModel:
    lm = tiny_lm(family, layers, 128, **config)
    return LoadedModel(lm, None, family, "local", find_blocks_path(lm))


def logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=ids, use_cache=False).logits


def zeroed_copy(loaded: LoadedModel, block: int, which: int) -> LoadedModel:
    """A copy whose branch `which` (0 attention, 1 MLP) of `block` has zero output projections."""
    other = copy.deepcopy(loaded)
    layer = other.blocks[block]
    path = OUTPUTS.get(loaded.name, LLAMA_OUTPUTS)[which]
    for part in path.split("."):
        layer = getattr(layer, part)
    with torch.no_grad():
        for param in layer.parameters():
            param.zero_()
    return other


@pytest.mark.parametrize("family,config", CASES)
def test_removed_sublayer_contributes_nothing(family, config):
    loaded = loaded_tiny(family, **config)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    base = logits(loaded, ids)
    for which, kind in enumerate("am"):
        with units_removed(loaded, [f"{kind}2"]):
            pruned = logits(loaded, ids)
        assert not torch.allclose(pruned, base)
        torch.testing.assert_close(pruned, logits(zeroed_copy(loaded, 2, which), ids), rtol=1e-5, atol=1e-5)
    # both sublayers, zeroed without normalizing them into the block, equal removing the block
    with sublayers_removed(loaded, (Unit(2, "a"), Unit(2, "m"))):
        both = logits(loaded, ids)
    with blocks_removed(loaded, [2]):
        torch.testing.assert_close(both, logits(loaded, ids), rtol=1e-5, atol=1e-5)
    # mixed with whole blocks, then everything restored
    with units_removed(loaded, parse_units("a0,b1,m3")):
        mixed = logits(loaded, ids)
    with units_removed(loaded, ["a0", "m3"]), blocks_removed(loaded, [1]):
        torch.testing.assert_close(mixed, logits(loaded, ids), rtol=0, atol=0)
    assert torch.equal(logits(loaded, ids), base)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_generation_with_the_kv_cache_and_a_removed_first_attention(family):
    loaded = loaded_tiny(family)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with units_removed(loaded, ["a0", "m2"]):
        cached = loaded.model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        plain = loaded.model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_parameters_removed():
    loaded = loaded_tiny("llama")
    block = sum(p.numel() for p in loaded.blocks[1].parameters())
    attn = sum(p.numel() for p in loaded.blocks[1].self_attn.parameters())
    mlp = sum(p.numel() for p in loaded.blocks[1].mlp.parameters())
    assert removed_parameters(loaded, (Unit(1, "a"),)) == attn
    assert removed_parameters(loaded, (Unit(1), Unit(3, "m"))) == block + mlp
    assert attn + mlp < block  # the norms stay with the block


def test_unsupported_family_and_bad_units():
    from transformers import BloomConfig, BloomForCausalLM

    lm = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_head=4, n_layer=2)).eval()
    loaded = LoadedModel(lm, None, "bloom", "local", find_blocks_path(lm))
    with pytest.raises(FamilyError, match="'bloom'; supported: .*gpt2.*llama"):
        branches_of(lm)
    with pytest.raises(FamilyError), units_removed(loaded, ["a1"]):
        pass
    with units_removed(loaded, ["b1"]):  # whole blocks need no adapter
        assert loaded.num_blocks == 1
    tiny = loaded_tiny("llama", layers=2)
    for bad, message in (["a2"], "out of range"), (["a0", "m0", "a1", "m1"], "every sublayer"):
        with pytest.raises(UnitError, match=message), units_removed(tiny, bad):
            pass
    with pytest.raises(FamilyError, match="pre-norm"):
        branches_of(tiny_lm("opt", 2, 128, do_layer_norm_before=False))
    assert "opt" in FAMILIES and branches_of(loaded_tiny("opt", layers=2).model).mlp == ("fc1", "fc2")
