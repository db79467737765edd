"""The `prune` entry point: one tracked run per Taylor width pruning, on tiny Llama/Mistral/Qwen2 and the default model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pruning.evaluate import Evaluator
from pruning.models import LoadedModel, converted_gguf, default_model_path, find_blocks_path
from pruning.tasks import load_task
from pruning.taylor import load_pruned
from search import tracking
from search.prune import LAYER_SERIES, PruneSettings, prune_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
GRAD_SUMMARY = ("grad_norm_ratio", "grad_mean_ratio", "grad_std_ratio", "grad_max_ratio", "grad_mean_range",
                "grad_norm_range")
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(converted_gguf(default_model_path()))


def tiny_dir(tmp_path: Path, family: str, tokenizer) -> str:
    """A tiny random model of `family` with the default model's tokenizer, saved like a hub checkpoint."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **SHAPE)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = tracking.experiment_id(client, "prune-test")
    run_id = client.create_run(exp_id).info.run_id
    return client, exp_id, run_id


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_prune_run_logs_the_contract_and_a_model_that_reloads(tmp_path, family, tokenizer):
    client, exp_id, run_id = store(tmp_path)
    settings = PruneSettings(model=tiny_dir(tmp_path, family, tokenizer), pruning_ratio=0.3, taylor_seq_len=32,
                             taylor_num_samples=8, n_samples=6, batch_size=4)
    metrics = prune_and_evaluate(client, run_id, exp_id, settings)

    logged = client.get_run(run_id).data.metrics
    for name in ("acc_pydoc_cloze", "acc_mean", "ppl", "baseline_acc_mean", "baseline_ppl", "n_params_before",
                 "n_params_after", "extreme_pruning_layers", *GRAD_SUMMARY):
        assert logged[name] == pytest.approx(metrics[name]), name
    assert metrics["acc_mean"] == metrics["acc_pydoc_cloze"]
    assert logged["headline_mean"] == logged["acc_mean"] and "baseline_headline_mean" in logged  # pydoc_cloze: acc
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert f"{name}_pydoc_ppl" in logged and f"baseline_{name}_pydoc_ppl" in logged, name
    run = client.get_run(run_id).data
    assert run.tags["headline/pydoc_cloze"] == "acc" and run.tags["headline/pydoc_ppl"] == "word_perplexity"
    assert run.params["ppl_window"] == "256"
    assert metrics["n_params_after"] < metrics["n_params_before"]
    assert 0.25 < metrics["pruned_fraction"] < 0.35
    for name in LAYER_SERIES:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [0, 1, 2, 3], name
    rates = [m.value for m in client.get_metric_history(run_id, "layer_pruning_rate")]
    assert metrics["extreme_pruning_layers"] == sum(r > 0.8 for r in rates)

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"prune_report.json", "group_importance.npz", "pruned_model", "per_example"} <= artifacts
    # The saved model is the model that was evaluated: reloaded, it gives the logged perplexity.
    saved = client.download_artifacts(run_id, "pruned_model", str(tmp_path / "download"))
    model = load_pruned(saved)
    assert sum(p.numel() for p in model.parameters()) == metrics["n_params_after"]
    loaded = LoadedModel(model, AutoTokenizer.from_pretrained(saved), saved, "", find_blocks_path(model))
    task = load_task("pydoc_ppl", "validation", 6, 0)
    ppl = Evaluator(loaded, [task], 4).evaluate(())["pydoc_ppl"].metrics["ppl"]
    assert ppl == pytest.approx(metrics["ppl"], rel=1e-4)


def test_baseline_is_one_configuration_run_shared_by_prunings(tmp_path, tokenizer):
    client, exp_id, first = store(tmp_path)
    model = tiny_dir(tmp_path, "llama", tokenizer)
    for run_id, ratio in ((first, 0.2), (client.create_run(exp_id).info.run_id, 0.4)):
        settings = PruneSettings(model=model, pruning_ratio=ratio, taylor_seq_len=16, taylor_num_samples=4,
                                 n_samples=4, batch_size=4, save_model=False)
        metrics = prune_and_evaluate(client, run_id, exp_id, settings)
    configs = client.search_runs([exp_id], "tags.`prunetrack.kind` = 'config'")
    assert len(configs) == 1 and configs[0].data.tags["removed_blocks"] == ""
    assert configs[0].data.metrics["ppl_pydoc_ppl"] == pytest.approx(metrics["baseline_ppl"])


def run_prune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.prune", "--tracking_uri", f"sqlite:///{cwd}/mlflow.db", *args],
                          capture_output=True, text=True, cwd=cwd)


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command (progress bars and store logs may precede it)."""
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, expected", [
    (["--pruning_ratio", "1.5"], "error: pruning_ratio 1.5 out of range; allowed: 0 < ratio < 1"),
    (["--pruning_ratio", "0"], "error: pruning_ratio 0.0 out of range; allowed: 0 < ratio < 1"),
    (["--taylor_order", "third"], "error: unknown taylor_order 'third'; allowed: first, second"),
    (["--sample", "random"], "error: unknown sample 'random'; allowed: seeded, first"),
])
def test_bad_options_fail_before_any_run(tmp_path, args, expected):
    out = run_prune(*args, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == expected  # nothing else: refused before the store is opened
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_bad_model_inputs_are_one_line_and_the_run_failed(tmp_path, tokenizer):
    long = run_prune("--model", tiny_dir(tmp_path, "llama", tokenizer), "--taylor_seq_len", "4096", cwd=tmp_path)
    assert error_line(long) == "error: seq_len 4096 out of range; allowed: 1..256 (the model's context)"
    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_head=4, n_layer=2,
                                                          vocab_size=len(tokenizer))).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    family = run_prune("--model", str(gpt2), cwd=tmp_path)
    assert error_line(family) == ("error: model type 'gpt2' not supported for width pruning; "
                                     "supported: llama, mistral, qwen2")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    assert all(r.data.tags[tracking.ERROR].startswith("ModelError: ") for r in runs)
    assert all(not r.data.metrics for r in runs)  # failed before any compute


@pytest.mark.slow
def test_mlflow_run_prune_on_the_default_model(tmp_path):
    """`mlflow run . -e prune --env-manager local` prunes SmolLM2 for real: smaller, worse, still a language model."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "prune", "--env-manager", "local",
           "-P", "n_samples=24", "-P", "taylor_num_samples=32", "-P", "pruning_ratio=0.3", "-P", "save_model=false"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`prunetrack.kind` = 'prune'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0].data
    assert {"pruning_ratio", "taylor_seq_len", "taylor_num_samples"} <= set(run.params)
    m = run.metrics
    assert m["n_params_after"] < 0.9 * m["n_params_before"]
    assert m["baseline_ppl"] < m["ppl"] < 100 * m["baseline_ppl"]  # 30% narrower hurts, but does not destroy it
    assert len(client.get_metric_history(runs[0].info.run_id, "layer_pruning_rate")) == 30
