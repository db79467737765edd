"""Tests for Taylor-importance width pruning on tiny random Llama / Mistral / Qwen2 models."""

import json

import numpy as np
import pytest
import torch
from helpers import char_tokenizer, tiny_lm

from pruning.calibration import calibration_batches, calibration_text
from pruning.models import ModelError
from pruning.taylor import (
    GradStats,
    LayerGroups,
    count_parameters,
    global_prune,
    gradient_summary,
    load_pruned,
    save_pruned,
    taylor_importance,
)

VOCAB = 256
TINY = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=128)  # 4 heads of 16, 2 KV heads


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A random 4-block model of `family` in the TINY shape."""
    return tiny_lm(family, 4, VOCAB, seed, **{**TINY, **overrides})


def random_batches(n: int = 2, batch: int = 2, seq: int = 16, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=generator) for _ in range(n)]


def prunable_params(model) -> int:
    """Group parameters of all blocks: q/k/v/o + gate/up/down weights and q/k/v/gate/up biases."""
    total = 0
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(layer.self_attn, name)
            has_bias = linear.bias is not None and name != "o_proj"
            total += linear.weight.numel() + (linear.bias.numel() if has_bias else 0)
        total += sum(getattr(layer.mlp, n).weight.numel() for n in ("gate_proj", "up_proj", "down_proj"))
    return total


def manual_grads(model, batches):
    """Reference gradients: backward of the sum of the per-batch mean losses in one graph."""
    model.zero_grad()
    sum(model(input_ids=b, labels=b).loss for b in batches).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


# --------------------------------------------------------------------------- importance


def test_first_order_matches_hand_computation_and_gqa_grouping():
    model = tiny_model("qwen2")  # q/k/v biases included
    batches = random_batches()
    grads = manual_grads(model, batches)
    groups, stats = taylor_importance(model, batches)
    assert len(groups) == len(stats) == 4

    def score(name):
        return (dict(model.named_parameters())[name].detach() * grads[name]).abs()

    layer, d = "model.layers.2", 16  # head_dim 16, 2 query heads per KV head
    kv = 1  # KV head 1 serves query heads 2 and 3
    q_rows, kv_rows = slice(2 * d, 4 * d), slice(d, 2 * d)
    expected_head = (
        score(f"{layer}.self_attn.q_proj.weight")[q_rows].sum()
        + score(f"{layer}.self_attn.q_proj.bias")[q_rows].sum()
        + score(f"{layer}.self_attn.k_proj.weight")[kv_rows].sum()
        + score(f"{layer}.self_attn.k_proj.bias")[kv_rows].sum()
        + score(f"{layer}.self_attn.v_proj.weight")[kv_rows].sum()
        + score(f"{layer}.self_attn.v_proj.bias")[kv_rows].sum()
        + score(f"{layer}.self_attn.o_proj.weight")[:, q_rows].sum()
    )
    torch.testing.assert_close(groups[2].head_importance[kv], expected_head, rtol=1e-4, atol=1e-8)
    channel = 37
    expected_channel = (
        score(f"{layer}.mlp.gate_proj.weight")[channel].sum()
        + score(f"{layer}.mlp.up_proj.weight")[channel].sum()
        + score(f"{layer}.mlp.down_proj.weight")[:, channel].sum()
    )
    torch.testing.assert_close(groups[2].channel_importance[channel], expected_channel, rtol=1e-4, atol=1e-8)
    assert groups[2].head_importance.shape == (2,) and groups[2].channel_importance.shape == (128,)

    names = [f"self_attn.{n}_proj" for n in "qkvo"] + [f"mlp.{n}_proj" for n in ("gate", "up", "down")]
    g = torch.cat([grads[f"{layer}.{n}.weight"].flatten() for n in names]).double()
    assert stats[2].norm == pytest.approx(g.norm().item(), rel=1e-4)
    assert stats[2].mean_abs == pytest.approx(g.abs().mean().item(), rel=1e-4)
    assert stats[2].std == pytest.approx(g.std(unbiased=False).item(), rel=1e-3)
    assert stats[2].max_abs == pytest.approx(g.abs().max().item(), rel=1e-4)


def test_accumulated_gradient_is_gradient_of_summed_batch_losses():
    """Two backward passes (one per batch) give the gradient of loss(batch1) + loss(batch2)."""
    model = tiny_model("llama")
    batches = random_batches()
    grads = manual_grads(model, batches)
    groups, _ = taylor_importance(model, batches)
    layer = model.model.layers[1]
    w_gate, w_up, w_down = (getattr(layer.mlp, n).weight.detach() for n in ("gate_proj", "up_proj", "down_proj"))
    g_gate, g_up, g_down = (grads[f"model.layers.1.mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    expected = (w_gate * g_gate).abs().sum(1) + (w_up * g_up).abs().sum(1) + (w_down * g_down).abs().sum(0)
    torch.testing.assert_close(groups[1].channel_importance, expected, rtol=1e-4, atol=1e-9)


def test_second_order_uses_per_batch_squared_gradients():
    """order="second": |w*g - 0.5 * w^2 * F|, g = summed gradient, F = sum of squared per-batch gradients."""
    model = tiny_model("mistral")
    batches = random_batches()
    per_batch = [manual_grads(model, [b]) for b in batches]
    params = dict(model.named_parameters())

    def part(name, dim):
        key = f"model.layers.0.mlp.{name}.weight"
        w = params[key].detach()
        g = sum(pb[key] for pb in per_batch)
        fisher = sum(pb[key] ** 2 for pb in per_batch)
        return (w * g - 0.5 * w * w * fisher).abs().sum(dim)

    groups, _ = taylor_importance(model, batches, order="second")
    expected = part("gate_proj", 1) + part("up_proj", 1) + part("down_proj", 0)
    torch.testing.assert_close(groups[0].channel_importance, expected, rtol=1e-4, atol=1e-9)
    first, _ = taylor_importance(model, batches)
    assert not torch.allclose(groups[0].channel_importance, first[0].channel_importance, rtol=1e-6, atol=0)


def test_importance_restores_model_state():
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    taylor_importance(model, random_batches(n=1))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.layers[0].mlp.up_proj.weight.requires_grad
    with pytest.raises(ModelError, match="unknown Taylor order"):
        taylor_importance(model, random_batches(n=1), order="third")


def test_gradient_summary_matches_numpy():
    stats = [GradStats(2.0, 0.1, 0.5, 3.0), GradStats(8.0, 0.4, 0.25, 1.5), GradStats(4.0, 0.0, 1.0, 6.0)]
    norms, means = np.array([2.0, 8.0, 4.0]), np.array([0.1, 0.4, 0.0])
    summary = gradient_summary(stats)
    assert summary["grad_norm_ratio"] == pytest.approx(norms.max() / norms.min())
    assert summary["grad_mean_ratio"] == pytest.approx(0.4 / 1e-12)  # zero minimum -> epsilon, stays finite
    assert summary["grad_std_ratio"] == pytest.approx(4.0)
    assert summary["grad_max_ratio"] == pytest.approx(4.0)
    assert summary["grad_mean_range"] == pytest.approx(np.ptp(means))
    assert summary["grad_norm_range"] == pytest.approx(np.ptp(norms))


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_global_prune_removes_ratio_and_model_still_runs(family):
    model = tiny_model(family)
    groups, _ = taylor_importance(model, random_batches())
    before, prunable = count_parameters(model), prunable_params(model)
    report = global_prune(model, groups, 0.3)

    head_params = 4 * 64 * 16 + 2 * 2 * 64 * 16 + (2 * 16 + 2 * 16 if family == "qwen2" else 0)  # q+o, k+v, biases
    removed = before - count_parameters(model)
    assert report.n_params_before == before and report.n_params_after == before - removed
    assert removed == prunable - prunable_params(model)
    assert 0.3 * prunable <= removed < 0.3 * prunable + head_params
    assert report.pruned_fraction == pytest.approx(removed / prunable)
    assert len(report.layer_rates) == 4 and all(0 <= r <= 1 for r in report.layer_rates)
    assert report.extreme_pruning_layers == sum(r > 0.8 for r in report.layer_rates)
    for layer, heads, channels, shape in zip(
        model.model.layers, report.heads_kept, report.channels_kept, model.config.prunetrack_layers
    ):
        assert layer.self_attn.k_proj.out_features == heads * 16 == shape["num_key_value_heads"] * 16
        assert layer.self_attn.q_proj.out_features == 2 * heads * 16 == shape["num_attention_heads"] * 16
        assert layer.mlp.down_proj.in_features == channels == shape["intermediate_size"] >= 1

    ids = random_batches(n=1, batch=1, seq=8)[0]
    assert model(ids).logits.shape == (1, 8, VOCAB)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (1, 13)
    no_cache = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)


def test_prune_keeps_most_important_groups():
    model = tiny_model("llama")
    groups = [LayerGroups(torch.tensor([5.0, 1.0]), torch.arange(128, dtype=torch.float) + 1000) for _ in range(4)]
    groups[3].channel_importance[:10] = 0.0  # the 10 weakest channels all live in block 3
    up = model.model.layers[3].mlp.up_proj.weight.detach().clone()
    report = global_prune(model, groups, 0.013)  # 1917 params: 10 channels of 192 params
    assert report.channels_kept == [128, 128, 128, 128 - 10] and report.heads_kept == [2, 2, 2, 2]
    torch.testing.assert_close(model.model.layers[3].mlp.up_proj.weight, up[10:])


def test_protect_first_last_and_max_layer_rate():
    model = tiny_model("llama")
    groups, _ = taylor_importance(model, random_batches(n=1))
    first = {n: p.clone() for n, p in model.model.layers[0].named_parameters()}
    report = global_prune(model, groups, 0.5, protect_first_last=True, max_layer_rate=0.5)
    assert report.layer_rates[0] == report.layer_rates[3] == 0.0
    assert report.heads_kept[0] == report.heads_kept[3] == 2
    assert report.channels_kept[0] == report.channels_kept[3] == 128
    channel_rate = 3 * 64 / 36864  # one channel of a block with 36864 prunable params
    assert all(0.5 - channel_rate < r <= 0.5 for r in report.layer_rates[1:3])  # the cap binds
    assert report.pruned_fraction == pytest.approx(sum(report.layer_rates) / 4)
    for name, param in model.model.layers[0].named_parameters():
        assert torch.equal(param, first[name])


@pytest.mark.parametrize("normalization", ["max", "sum", "mean", "standardize"])
def test_normalizations_prune_about_ratio(normalization):
    model = tiny_model("llama")
    groups = [LayerGroups(torch.rand(2) * 10**b, torch.rand(128) * 10**b) for b in range(4)]
    prunable = prunable_params(model)
    report = global_prune(model, groups, 0.2, normalization=normalization, min_heads=2)
    assert report.pruned_fraction >= 0.2 and report.heads_kept == [2, 2, 2, 2]
    assert prunable_params(model) == pytest.approx(prunable * (1 - report.pruned_fraction))


@pytest.mark.parametrize("ratio", [1.5, 0.0, 1.0, -0.1])
def test_bad_ratio_is_a_one_line_error(ratio):
    model = tiny_model("llama")
    with pytest.raises(ModelError) as err:
        global_prune(model, [], ratio)
    assert str(err.value) == f"pruning_ratio {ratio} out of range; allowed: 0 < ratio < 1"


def test_unsupported_family_and_bad_options():
    gpt2 = tiny_lm("gpt2", 1, 64)
    with pytest.raises(ModelError, match="'gpt2' not supported.*llama, mistral, qwen2"):
        global_prune(gpt2, [], 0.2)
    with pytest.raises(ModelError, match="unknown normalization"):
        global_prune(tiny_model(), [], 0.2, normalization="l2")


@pytest.mark.parametrize("family, tied", [("qwen2", False), ("llama", True)])
def test_save_load_reproduces_logits(tmp_path, family, tied):
    model = tiny_model(family, tie_word_embeddings=tied)
    groups, _ = taylor_importance(model, random_batches())
    global_prune(model, groups, 0.4)
    save_pruned(model, char_tokenizer(), tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    loaded = load_pruned(tmp_path)
    ids = random_batches(n=1, batch=2, seq=12)[0]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert count_parameters(loaded) == count_parameters(model)
    assert loaded.config.prunetrack_layers == model.config.prunetrack_layers
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


# --------------------------------------------------------------------------- calibration


def test_calibration_batches_from_pydoc_are_seeded_windows():
    tokenizer = char_tokenizer()
    batches = calibration_batches(tokenizer, seq_len=32, num_samples=20, seed=3, batch_size=8)
    assert [b.shape for b in batches] == [(8, 32), (8, 32), (4, 32)]
    assert all(b.dtype == torch.long for b in batches)
    again = calibration_batches(tokenizer, seq_len=32, num_samples=20, seed=3, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = calibration_batches(tokenizer, seq_len=32, num_samples=20, seed=4, batch_size=8)
    assert not torch.equal(batches[0], other[0])
    window = tokenizer.decode(batches[0][0].tolist()).replace(" ", "")
    assert window in calibration_text("pydoc").replace(" ", "")


def test_calibration_from_files_and_errors(tmp_path):
    tokenizer = char_tokenizer()
    txt = tmp_path / "corpus.txt"
    txt.write_text("abcdefghij" * 3)
    (batch,) = calibration_batches(tokenizer, str(txt), seq_len=8, num_samples=4, batch_size=8)
    assert batch.shape == (4, 8)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(json.dumps({"id": 1, "body": "xyz" * 5}) + "\n" + json.dumps({"text": "uvw" * 5}) + "\n")
    assert calibration_text(str(jsonl)) == "xyz" * 5 + "\n\n" + "uvw" * 5
    windows = calibration_batches(tokenizer, str(jsonl), seq_len=16, num_samples=2)
    assert [w.shape for w in windows] == [(2, 16)]
    assert all(tokenizer.decode(row.tolist()).replace(" ", "") in ("xyz" * 5 + "\n\n" + "uvw" * 5) for row in windows[0])

    with pytest.raises(ModelError, match="has 30 tokens; seq_len 30 needs at least 31"):
        calibration_batches(tokenizer, str(txt), seq_len=30)
    with pytest.raises(ModelError, match="seq_len 256 out of range; allowed: 1..128"):
        calibration_batches(tokenizer, seq_len=256, max_len=128)
    with pytest.raises(ModelError, match="num_samples 0 out of range"):
        calibration_batches(tokenizer, num_samples=0)
    with pytest.raises(ModelError, match="unknown calibration source"):
        calibration_batches(tokenizer, "wikitext")
    with pytest.raises(ModelError, match="not found"):
        calibration_batches(tokenizer, str(tmp_path / "missing.txt"))
