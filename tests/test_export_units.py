"""Exporting sublayer-removed models (pruning.export_units, search.export_model's `units`): the folder ships
its modeling code, loads with plain transformers and no prunetrack, computes what the in-place removal
computes, and generates with a KV cache that holds the kept attention layers only; tiny random models."""

import json
import subprocess
import sys
import sysconfig

import mlflow
import pytest
import torch
from helpers import char_tokenizer, runs, tiny_lm
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from contract import names
from pruning.export_units import MODELING_FILE, save_without_units
from pruning.families import removed_parameters, units_removed
from pruning.models import LoadedModel, find_blocks_path, load_model
from pruning.units import check_config, parse_units
from search import export_model
from search.cli import run_main

TOL = 1e-5  # fp32
SPEED = ["--speed_batch", "2", "--prompt_len", "16", "--new_tokens", "4", "--repeats", "1"]
# (family, config, units) on 6 blocks: an attention, an MLP and a whole block removed, the first attention among them
# (the cache's length is read from its first layer); Qwen2 and Gemma2 mix sliding-window and full attention layers.
CASES = {
    "llama": ({}, "a0,m2,b3,a5"),
    "qwen2": (dict(use_sliding_window=True, sliding_window=4, max_window_layers=3), "a0,a2,m4,b5"),
    "gemma2": (dict(sliding_window=4), "a0,m1,b2,a3"),
    "gpt2": ({}, "a0,m3,b4"),
    "opt": ({}, "a1,m2,b5"),
}

# Runs in a fresh interpreter without site processing (so prunetrack's editable install is not on its path),
# from a directory outside the project: loads each export with transformers alone and reports what it computes.
LOADER = """
import json, sys
sys.path.append(sys.argv[1])
import torch
from transformers import AutoModelForCausalLM
for name in ("pruning", "search", "contract"):
    try:
        __import__(name)
        raise SystemExit(f"{name} is importable")
    except ImportError:
        pass
report = {}
for folder in sys.argv[2:]:
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        refused = ""
    except Exception as err:
        refused = str(err)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.load(f"{folder}/ids.pt")
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cached = model.generate(ids[:1], max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids[:1], max_new_tokens=8, do_sample=False, use_cache=False)
    torch.save(out.logits, f"{folder}/logits.pt")
    cache = out.past_key_values
    report[folder] = {
        "refused": refused,
        "cache_layers": len(cache.layers),
        "sliding": list(cache.is_sliding),
        "lengths": [layer.keys.shape[-2] for layer in cache.layers],
        "generate_equal": torch.equal(cached, uncached),
        "generated": cached.shape[-1] - ids.shape[-1],
    }
print()  # after transformers' unanswered trust_remote_code prompt
print(json.dumps(report))
"""


def loaded_tiny(family: str, **config) -> LoadedModel:
    lm = tiny_lm(family, 6, 128, **{"initializer_range": 0.3, **config})
    return LoadedModel(lm, None, family, "local", find_blocks_path(lm))


def test_sublayer_exports_load_without_prunetrack_and_compute_the_in_place_removal(tmp_path):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    expected, kept = {}, {}
    for family, (config, text) in CASES.items():
        loaded = loaded_tiny(family, **config)
        units = check_config(parse_units(text), 6)
        with torch.inference_mode(), units_removed(loaded, units):
            expected[family] = loaded.model(ids, use_cache=False).logits
        folder = tmp_path / family
        n_params = sum(p.numel() for p in loaded.model.parameters())
        assert save_without_units(loaded, units, folder) == units
        assert loaded.num_blocks == 6 and sum(p.numel() for p in loaded.model.parameters()) == n_params  # unchanged
        torch.save(ids, folder / "ids.pt")
        with safe_open(folder / "model.safetensors", "pt") as weights:  # the removed units' weights are not in it
            assert sum(weights.get_tensor(k).numel() for k in weights.keys()) == n_params - removed_parameters(loaded, units)
        saved = json.loads((folder / "config.json").read_text())
        assert saved["model_type"] == f"prunetrack_{family}" and (folder / MODELING_FILE).is_file()
        removed_attention = {u.block for u in units if u.kind == "a"} | {u.block for u in units if u.is_block}
        layer_types = getattr(loaded.model.config, "layer_types", None) or ["full_attention"] * 6
        kept[family] = [layer_types[b] == "sliding_attention" for b in range(6) if b not in removed_attention]

    purelib = sysconfig.get_paths()["purelib"]
    folders = [str(tmp_path / family) for family in CASES]
    done = subprocess.run(
        [sys.executable, "-S", "-c", LOADER, purelib, *folders],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for family in CASES:
        got = report[str(tmp_path / family)]
        assert "trust_remote_code" in got["refused"], family  # without the code it refuses rather than misloads
        logits = torch.load(tmp_path / family / "logits.pt")
        assert torch.allclose(logits, expected[family], atol=TOL), (family, float((logits - expected[family]).abs().max()))
        assert got["cache_layers"] == len(kept[family]) and got["sliding"] == kept[family], family
        assert got["lengths"] == [3 if s else 12 for s in kept[family]], family  # a window of 4 keeps 3 past tokens
        assert got["generate_equal"] and got["generated"] == 8, family
    assert any(kept["qwen2"]) and not all(kept["qwen2"]) and any(kept["gemma2"]) and not all(kept["gemma2"])


def test_whole_blocks_export_as_a_plain_config(tmp_path):
    loaded = loaded_tiny("llama")
    save_without_units(loaded, parse_units("a2,m2,b4"), tmp_path)  # a2 and m2 are block 2
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["num_hidden_layers"] == 4 and "auto_map" not in saved
    assert not (tmp_path / MODELING_FILE).exists()


@pytest.mark.usefixtures("one_thread", "scratch_cwd")
def test_export_model_units_logs_kv_cache_and_the_mlflow_model_loads(sqlite_store, tiny_model_dir, tmp_path):
    store = sqlite_store[1]
    model_dir = tiny_model_dir(layers=6, initializer_range=0.3)
    out = tmp_path / "exported"
    argv = ["--model", model_dir, "--units", "m3,a1,b4", "--blocks", "0", "--tasks", "pydoc_ppl", "--n_samples", "2"]
    argv += ["--device", "cpu", "--dtype", "float32", "--tracking_uri", store.tracking_uri, "--output_dir", str(out), *SPEED]
    assert run_main(export_model.main, argv) == 0
    (run,) = runs(store, "export")
    tags, metrics = run.data.tags, run.data.metrics
    assert tags[names.REMOVED_UNITS] == "b0,a1,m3,b4" and tags[names.REMOVED_BLOCKS] == "0,4"
    assert run.data.params["num_removed"] == "4"
    dense = load_model(model_dir, device="cpu", dtype="float32")
    config = check_config(parse_units("b0,a1,m3,b4"), 6)
    assert metrics["n_params_dense"] - metrics["n_params"] == removed_parameters(dense, config)
    assert metrics["export_max_logit_diff"] <= TOL
    # 6 attention layers dense, 3 kept (blocks 2, 3, 5): half the cache per token
    assert metrics[names.KV_CACHE_BYTES_PER_TOKEN] == metrics[names.KV_CACHE_BYTES_PER_TOKEN_DENSE] / 2 > 0
    ids = torch.randint(0, 100, (1, 10))
    with torch.inference_mode(), units_removed(dense, config):
        expected = dense.model(ids).logits
    model = mlflow.transformers.load_model(f"runs:/{run.info.run_id}/model", return_type="components", trust_remote_code=True)
    with torch.inference_mode():
        assert torch.allclose(model["model"](ids).logits, expected, atol=TOL)
    assert (out / MODELING_FILE).is_file()


@pytest.mark.usefixtures("one_thread", "scratch_cwd")
def test_bad_units_are_one_line_exit_2_and_write_nothing(sqlite_store, tiny_model_dir, tmp_path, capsys):
    store = sqlite_store[1]
    model_dir = tiny_model_dir(layers=6, initializer_range=0.3)
    unsupported = tmp_path / "stablelm"  # a family without an adapter
    shapes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("stablelm", vocab_size=128, **shapes)).save_pretrained(unsupported)
    char_tokenizer().save_pretrained(unsupported)
    cases = {
        "does not parse": ([model_dir, "x4"], "cannot parse 'x4'"),
        "out of range": ([model_dir, "a6"], "unit a6 out of range; allowed blocks 0..5"),
        "whole model": ([model_dir, "a0-5,m0-5"], "cannot remove every block"),
        "no adapter": ([str(unsupported), "a1"], "does not support model family 'stablelm'"),
    }
    for name, ((model, units), message) in cases.items():
        argv = ["--model", model, "--units", units, "--register_as", "never", "--device", "cpu", "--dtype", "float32"]
        code = run_main(export_model.main, [*argv, "--tracking_uri", store.tracking_uri, *SPEED])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert code == 2 and len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], (name, errors)
    assert runs(store) == [] and not store.search_registered_models()


@pytest.mark.slow
def test_default_model_without_eight_attention_layers_loads_and_generates(tmp_path):
    dense = load_model("default", device="cpu", dtype="float32")
    units = check_config(parse_units("a20-27"), dense.num_blocks)
    ids = dense.tokenizer("def main():\n    return 0", return_tensors="pt").input_ids
    with torch.inference_mode(), units_removed(dense, units):
        expected = dense.model(ids).logits
    save_without_units(dense, units, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cached = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.allclose(out.logits, expected, atol=1e-4)
    assert len(out.past_key_values.layers) == 22 and torch.equal(cached, uncached)
