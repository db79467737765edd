"""`export_model`: physical block removal, the exported Hugging Face and MLflow models, speed metrics, the
Model Registry, width-pruned models, bad input; tiny random models, and the default model once (slow)."""

import math
import statistics
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import runs, tiny_lm
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from contract import names, tracking
from contract.records import BeamResults, Recommendation
from pruning import taylor
from pruning.drop import drop
from pruning.evaluate import Evaluator
from pruning.models import LoadedModel, blocks_removed, find_blocks_path, load_model, save_without_blocks
from pruning.tasks import load_task
from search import export_model, speedup
from search.cli import run_main

TASKS = ["pydoc_ppl", "pydoc_cloze"]
N_BLOCKS = 6
SPEED = ["--speed_batch", "2", "--prompt_len", "16", "--new_tokens", "4", "--repeats", "2", "--max_repeats", "2"]
TOL = 1e-5  # fp32: the exported model computes exactly what the in-place removal computes


pytestmark = pytest.mark.usefixtures("one_thread", "scratch_cwd")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    """A random 6-block Llama with the character tokenizer (tests/conftest.py)."""
    return tiny_model_dir(layers=N_BLOCKS, initializer_range=0.3)


@pytest.fixture
def store(sqlite_store) -> MlflowClient:
    """A fresh SQLite tracking store's client."""
    return sqlite_store[1]


def removed_logits(model_dir: str, removed, ids) -> torch.Tensor:
    """Logits of the project's in-place removal on the model in `model_dir`."""
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    with torch.inference_mode(), blocks_removed(loaded, removed):
        return loaded.model(ids).logits


def beam_run(client, model_dir: str, removed_by_k: dict[int, tuple[int, ...]]) -> str:
    """A finished beam search run as search.beam records it, with one scored configuration run per recommendation."""
    exp_id = tracking.experiment_id(client, "beam_search/tiny")
    parent = client.create_run(exp_id, tags={names.KIND: "beam_search"}).info.run_id
    tracking.log(
        client,
        parent,
        params={
            "model": model_dir,
            "tasks": ",".join(TASKS),
            "split": "validation",
            "n_samples": 4,
            "seed": 0,
            "model_revision": "local",
            "model_blocks_path": "model.layers",
        },
    )
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    tasks = [load_task(t, "validation", 4, 0) for t in TASKS]
    evaluator = Evaluator(loaded, tasks, 8)
    baseline = {name: dict(s.metrics) for name, s in evaluator.evaluate(()).items()}
    recommendations, previous = [], 0.0
    for k, removed in removed_by_k.items():
        child = client.create_run(exp_id, tags={names.KIND: "config"}).info.run_id
        scores = evaluator.evaluate(removed)
        tracking.log(client, child, metrics={f"{m}_{s.task}": v for s in scores.values() for m, v in s.metrics.items()})
        client.set_terminated(child)
        drops = {t.name: drop(t, baseline[t.name], scores[t.name].metrics) for t in tasks}
        mean = statistics.fmean(drops.values())
        recommendations.append(
            Recommendation(
                k,
                list(removed),
                mean,
                statistics.pstdev(drops.values()),
                len(drops),
                mean - previous,
                N_BLOCKS - k,
                [b for b in range(N_BLOCKS) if b not in removed],
                drops,
                tracking.config_hash({"removed": list(removed)}),
                child,
                True,
            )
        )
        previous = mean
    results = BeamResults(
        model_dir,
        TASKS,
        N_BLOCKS,
        {"criterion": "mean"},
        baseline,
        None,
        recommendations,
        {str(e.num_active_blocks): e.active_blocks for e in recommendations},
    )
    tracking.log_json(client, parent, names.BEAM_RESULTS, results.to_json())
    client.set_terminated(parent)
    return parent


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_removed_blocks_save_as_a_plain_model_equal_to_in_place_removal(tmp_path, family):
    extra = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2) if family == "qwen2" else {}
    lm = tiny_lm(family, 5, 64, **extra)
    loaded = LoadedModel(lm, None, family, "local", find_blocks_path(lm))
    ids = torch.randint(0, 64, (2, 12))
    layer_types = list(getattr(lm.config, "layer_types", None) or [])
    with torch.inference_mode(), blocks_removed(loaded, [1, 3]):
        expected = lm(ids).logits
    assert save_without_blocks(loaded, [3, 1], tmp_path) == (1, 3)
    assert loaded.num_blocks == 5 and lm.config.num_hidden_layers == 5  # unchanged

    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no project code
    assert plain.config.num_hidden_layers == 3 and len(plain.model.layers) == 3
    if layer_types:  # qwen2: layers 2.. use the sliding window; kept blocks 0, 2, 4
        assert plain.config.layer_types == [layer_types[i] for i in (0, 2, 4)] == ["full_attention", *["sliding_attention"] * 2]
    with torch.inference_mode():
        assert torch.allclose(plain(ids).logits, expected, atol=TOL)
        cached = plain.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = plain.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_export_of_a_beam_recommendation_logs_registers_and_measures(store, model_dir, tmp_path, capsys, monkeypatch):
    # two very steady rounds can give an interval within ±5% by chance: hold every interval to be wider
    monkeypatch.setattr(speedup, "tight", lambda interval, target=speedup.TARGET: False)
    source = beam_run(store, model_dir, {1: (2,), 2: (2, 4)})
    out = tmp_path / "exported"
    argv = [
        "--run_id",
        source,
        "--num_removed",
        "2",
        "--register_as",
        "tiny-pruned",
        "--output_dir",
        str(out),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--tracking_uri",
        store.tracking_uri,
        *SPEED,
    ]
    assert run_main(export_model.main, argv) == 0
    (run,) = runs(store, "export")
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["removed_blocks"] == "2,4" and tags["source_run_id"] == source
    assert (params["num_removed"], params["dtype"], params["device"]) == ("2", "float32", "cpu")
    dense = load_model(model_dir, device="cpu", dtype="float32")
    removed_params = sum(p.numel() for b in (2, 4) for p in dense.blocks[b].parameters())
    assert metrics["n_params_dense"] - metrics["n_params"] == removed_params
    assert metrics["weight_mb_dense"] - metrics["weight_mb"] == pytest.approx(4 * removed_params / 2**20)  # float32
    assert {"acc_pydoc_cloze", "ppl_pydoc_ppl"} <= set(metrics)
    assert metrics["rescore_max_diff"] < 1e-6  # the exported model scores as the beam's configuration run did
    assert metrics["export_max_logit_diff"] <= TOL
    # the logged speeds are the medians of the timings in speed.json (2 x 16 prompt tokens, 2 x 4 new tokens)
    speed = tracking.load_json(store, run.info.run_id, "speed.json")
    assert speed["settings"]["batch"] == 2 and len(speed["dense"]["prefill_seconds"]) == 2
    for side, suffix in (("pruned", ""), ("dense", "_dense")):
        timings = speed[side]
        assert metrics[f"prefill_tokens_per_s{suffix}"] == pytest.approx(32 / statistics.median(timings["prefill_seconds"]))
        assert metrics[f"decode_tokens_per_s{suffix}"] == pytest.approx(8 / statistics.median(timings["decode_seconds"]))
        assert metrics[f"peak_memory_mb{suffix}"] == pytest.approx(timings["peak_memory_mb"])
        assert timings["peak_memory_mb"] > timings["weight_mb"]  # a process holding the weights
    for phase in ("prefill", "decode"):  # the geometric mean of the paired rounds' ratios, inside its interval
        ratios = [d / p for d, p in zip(speed["dense"][f"{phase}_seconds"], speed["pruned"][f"{phase}_seconds"])]
        geometric = math.exp(statistics.mean(math.log(r) for r in ratios))
        assert metrics[f"{phase}_speedup"] == pytest.approx(geometric) and speed[f"{phase}_speedup"] == pytest.approx(geometric)
        assert metrics[f"{phase}_speedup_low"] < geometric < metrics[f"{phase}_speedup_high"]
    # an interval wider than ±5% after the 2 rounds: the run's description and the log say the figure is unreliable
    assert metrics["speed_rounds"] == 2 and metrics["speedup_bound"] == pytest.approx(N_BLOCKS / (N_BLOCKS - 2), rel=0.01)
    note = tags[names.DESCRIPTION]
    assert "| prefill tokens/s (median) |" in note and "**Warning:** prefill speedup" in note and "unreliable" in note
    assert "warning: prefill speedup" in capsys.readouterr().err
    source_params = store.get_run(source).data.params
    for key in ("tasks", "split", "n_samples"):  # the data it was re-scored on: the beam search's
        assert params[f"rescore_{key}"] == source_params[key]
    assert not (out / ".gitignore").exists()  # outside a git checkout nothing is added (tests/test_readable.py: inside)

    ids = torch.randint(0, 100, (2, 10))
    expected = removed_logits(model_dir, (2, 4), ids)
    for uri in (f"runs:/{run.info.run_id}/model", "models:/tiny-pruned/1"):
        parts = mlflow.transformers.load_model(uri, return_type="components")
        assert parts["model"].config.num_hidden_layers == N_BLOCKS - 2
        assert torch.allclose(parts["model"](ids).logits, expected, atol=TOL)
    version = store.get_model_version("tiny-pruned", "1")
    assert version.tags["source_run_id"] == source and version.tags["removed_blocks"] == "2,4"
    assert source in version.description and "[2,4]" in version.description
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(plain(ids).logits, expected, atol=TOL)


def width_pruned_run(client, model_dir: str, uniform: bool) -> tuple[str, Path]:
    """A prune run whose pruned_model/ keeps 1 of 2 KV groups and 48 or 40 of 64 channels in every block."""
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    for b, block in enumerate(loaded.blocks):
        taylor._slice_block(block, [1], list(range(48 if uniform or b else 40)))
    loaded.model.config.prunetrack_layers = [taylor._layer_shape(block) for block in loaded.blocks]
    path = Path(client.tracking_uri.removeprefix("sqlite:///")).parent / f"pruned-{uniform}"
    taylor.save_pruned(loaded.model, loaded.tokenizer, path)
    exp_id = tracking.experiment_id(client, "prune/tiny")
    run_id = client.create_run(exp_id, tags={names.KIND: "prune"}).info.run_id
    tracking.log(
        client,
        run_id,
        params={
            "model": model_dir,
            "tasks": "pydoc_cloze",
            "ppl_task": "pydoc_ppl",
            "split": "validation",
            "n_samples": 4,
            "seed": 0,
            "model_revision": "local",
        },
    )
    client.log_artifacts(run_id, str(path), "pruned_model")
    client.set_terminated(run_id)
    return run_id, path


def test_width_pruned_model_with_uniform_layers_exports_as_a_plain_model(store, model_dir):
    source, path = width_pruned_run(store, model_dir, uniform=True)
    argv = ["--run_id", source, "--device", "cpu", "--dtype", "float32", "--tracking_uri", store.tracking_uri, *SPEED]
    assert run_main(export_model.main, argv) == 0
    (run,) = runs(store, "export")
    assert run.data.tags["removed_blocks"] == "" and run.data.params["num_removed"] == "0"
    assert run.data.metrics["n_params"] < run.data.metrics["n_params_dense"]
    model = mlflow.transformers.load_model(f"runs:/{run.info.run_id}/model", return_type="components")["model"]
    assert (model.config.num_key_value_heads, model.config.intermediate_size) == (1, 48)
    ids = torch.randint(0, 100, (2, 10))
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, taylor.load_pruned(path)(ids).logits, atol=TOL)


def bad_inputs(client, model_dir: str) -> dict[str, tuple[list[str], str]]:
    beam = beam_run(client, model_dir, {1: (2,)})
    config_run = client.create_run(tracking.experiment_id(client, "other"), tags={names.KIND: "config"}).info.run_id
    width, _ = width_pruned_run(client, model_dir, uniform=False)
    return {
        "not a beam search": (["--run_id", config_run], "is a config run; allowed: a beam_search or prune run"),
        "k not searched": (["--run_id", beam, "--num_removed", "3"], "num_removed 3 was not searched"),
        "block out of range": (["--model", model_dir, "--blocks", "1,6"], "block index 6 out of range; allowed: 0..5"),
        "run and blocks": (["--run_id", beam, "--blocks", "1"], "not both"),
        "unknown run": (["--run_id", "0" * 32], "not found"),
        "width not plain": (["--run_id", width], "cannot express; load its artifact pruned_model/"),
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(store, model_dir, capsys):
    cases = bad_inputs(store, model_dir)
    before = {r.info.run_id for r in runs(store)}
    capsys.readouterr()
    for name, (args, message) in cases.items():
        code = run_main(
            export_model.main, [*args, "--register_as", "never", "--device", "cpu", "--tracking_uri", store.tracking_uri, *SPEED]
        )
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert code == 2 and len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], (name, errors)
    assert {r.info.run_id for r in runs(store)} == before
    assert not store.search_registered_models()


@pytest.mark.slow
def test_default_model_export_is_smaller_faster_and_scores_the_same(store, capsys):
    argv = [
        "--model",
        "default",
        "--blocks",
        "5,6,7",
        "--tasks",
        "pydoc_ppl",
        "--n_samples",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--tracking_uri",
        store.tracking_uri,
        "--speed_batch",
        "1",
        "--prompt_len",
        "64",
        "--new_tokens",
        "8",
        "--repeats",
        "3",
    ]
    assert run_main(export_model.main, argv) == 0
    (run,) = runs(store, "export")
    metrics = run.data.metrics
    assert metrics["n_params_dense"] - metrics["n_params"] == 3 * 3_540_096  # SmolLM2-135M: 3.54M per block
    assert metrics["export_max_logit_diff"] <= 1e-4
    in_place = Evaluator(load_model("default", device="cpu", dtype="float32"), [load_task("pydoc_ppl", "validation", 1, 0)], 8)
    assert metrics["ppl_pydoc_ppl"] == pytest.approx(in_place.evaluate((5, 6, 7))["pydoc_ppl"].metrics["ppl"], rel=1e-4)
