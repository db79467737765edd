"""The `prune` entry point: one tracked run per Taylor width pruning, on tiny Llama/Mistral/Qwen2 and the default model."""

from pathlib import Path

import pytest
from helpers import mlflow_run, runs
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from contract import names, tracking
from pruning.evaluate import Evaluator
from pruning.models import LoadedModel, find_blocks_path
from pruning.tasks import load_task
from pruning.taylor import load_pruned
from search import prune
from search.cli import run_main
from search.prune import LAYER_SERIES, PruneSettings, prune_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
GRAD_SUMMARY = ("grad_norm_ratio", "grad_mean_ratio", "grad_std_ratio", "grad_max_ratio", "grad_mean_range", "grad_norm_range")
WIDE = dict(hidden_size=64, intermediate_size=128)  # 4 blocks of 2 KV groups of 16 dimensions, 128 channels


def prune_run(client: MlflowClient) -> tuple[str, str]:
    """(experiment id, run id) of a new run for a pruning."""
    exp_id = tracking.experiment_id(client, "prune-test")
    return exp_id, client.create_run(exp_id).info.run_id


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_prune_run_logs_the_contract_and_a_model_that_reloads(tmp_path, tiny_model_dir, sqlite_store, family):
    _, client = sqlite_store
    exp_id, run_id = prune_run(client)
    settings = PruneSettings(
        model=tiny_model_dir(family, **WIDE),
        pruning_ratio=0.3,
        taylor_seq_len=32,
        taylor_num_samples=8,
        n_samples=6,
        batch_size=4,
    )
    metrics = prune_and_evaluate(client, run_id, exp_id, settings)

    logged = client.get_run(run_id).data.metrics
    for name in (
        "acc_pydoc_cloze",
        "acc_mean",
        "ppl",
        "baseline_acc_mean",
        "baseline_ppl",
        "n_params_before",
        "n_params_after",
        "extreme_pruning_layers",
        *GRAD_SUMMARY,
    ):
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


def test_baseline_is_one_configuration_run_shared_by_prunings(tiny_model_dir, sqlite_store):
    _, client = sqlite_store
    exp_id, first = prune_run(client)
    model = tiny_model_dir(**WIDE)
    for run_id, ratio in ((first, 0.2), (client.create_run(exp_id).info.run_id, 0.4)):
        settings = PruneSettings(
            model=model, pruning_ratio=ratio, taylor_seq_len=16, taylor_num_samples=4, n_samples=4, batch_size=4, save_model=False
        )
        metrics = prune_and_evaluate(client, run_id, exp_id, settings)
    configs = client.search_runs([exp_id], "tags.`prunetrack.kind` = 'config'")
    assert len(configs) == 1 and configs[0].data.tags["removed_blocks"] == ""
    assert configs[0].data.metrics["ppl_pydoc_ppl"] == pytest.approx(metrics["baseline_ppl"])


def error_line(capsys, uri: str, *args: str) -> str:
    """The one error line of a `prune` command that must be refused (progress bars and store logs may precede it)."""
    assert run_main(prune.main, ["--tracking_uri", uri, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--pruning_ratio", "1.5"], "error: pruning_ratio 1.5 out of range; allowed: 0 < ratio < 1"),
        (["--pruning_ratio", "0"], "error: pruning_ratio 0.0 out of range; allowed: 0 < ratio < 1"),
        (["--taylor_order", "third"], "error: unknown taylor_order 'third'; allowed: first, second"),
        (["--sample", "random"], "error: sample 'random' is not valid; allowed: seeded, first"),
    ],
)
def test_bad_options_fail_before_any_run(tmp_path, capsys, args, expected):
    assert run_main(prune.main, ["--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", *args]) == 2
    assert capsys.readouterr().err.strip() == expected  # nothing else
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store is opened


def test_bad_model_inputs_are_one_line_and_the_run_failed(tiny_model_dir, sqlite_store, capsys):
    uri, client = sqlite_store
    assert error_line(capsys, uri, "--model", tiny_model_dir(), "--taylor_seq_len", "4096") == (
        "error: seq_len 4096 out of range; allowed: 1..256 (the model's context)"
    )
    assert error_line(capsys, uri, "--model", tiny_model_dir("gpt2", 2)) == (
        "error: model type 'gpt2' not supported for width pruning; supported: llama, mistral, qwen2"
    )
    failed = runs(client)
    assert len(failed) == 2 and {r.info.status for r in failed} == {"FAILED"}
    assert all(r.data.tags[names.ERROR].startswith("ModelError: ") for r in failed)
    assert all(not r.data.metrics for r in failed)  # failed before any compute


@pytest.mark.slow
@pytest.mark.service
def test_mlflow_run_prune_on_the_default_model(tmp_path, sqlite_store):
    """`mlflow run . -e prune --env-manager local` prunes SmolLM2 for real: smaller, worse, still a language model."""
    uri, client = sqlite_store
    params = ("n_samples=8", "taylor_num_samples=32", "pruning_ratio=0.3", "save_model=false")
    out = mlflow_run(uri, "prune", *params, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (pruned,) = runs(client, "prune")
    assert pruned.info.status == "FINISHED"
    run = pruned.data
    assert {"pruning_ratio", "taylor_seq_len", "taylor_num_samples"} <= set(run.params)
    m = run.metrics
    assert m["n_params_after"] < 0.9 * m["n_params_before"]
    assert m["baseline_ppl"] < m["ppl"] < 100 * m["baseline_ppl"]  # 30% narrower hurts, but does not destroy it
    assert len(client.get_metric_history(pruned.info.run_id, "layer_pruning_rate")) == 30
