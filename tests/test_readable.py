"""Results readable where users look: progress estimates that hold, run descriptions, sortable run
names with each configuration's own time, labelled figures, reuse shown, speedups with intervals,
and the MLflow UI showing a beam search's recommendation table (headless Chromium)."""

import logging
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from helpers import copy_store, runs
from servers import mlflow_server

from contract import cli, names, tracking
from contract.records import BeamResults
from pruning.evaluate import Evaluator
from pruning.models import load_model
from pruning.tasks import load_task
from search import beam, figures, progress, sensitivity, speedup
from search.cli import run_main

TASKS = ["pydoc_ppl", "pydoc_cloze"]
N_BLOCKS = 6

pytestmark = pytest.mark.usefixtures("one_thread", "scratch_cwd")  # tests/conftest.py


class FakeClock:
    """Time that advances only by the work the model does: each block's forward adds its rows x width
    tokens, with an attention term growing with the width (so long padded rows cost more per token)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def block_hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rows, width = hidden.shape[:2]
        self.now += rows * width * (1 + width / 64) * 1e-6


def test_estimate_is_within_2x_of_the_real_time_after_the_first_10_percent(tiny_model_dir):
    loaded = load_model(tiny_model_dir(layers=8))
    tasks = [load_task(t, "validation", 24, 0) for t in TASKS]
    evaluator = Evaluator(loaded, tasks, 4)
    clock = FakeClock()
    handles = [block.register_forward_pre_hook(clock.block_hook, with_kwargs=True) for block in loaded.blocks]
    configs = [()] + [(b,) for b in range(8)] + [(2, 5), (0, 7)]
    work, unit = progress.work_of(evaluator)
    assert unit == "token" and work == evaluator.n_tokens
    seen = []

    class Watch(progress.Progress):
        def update(self, n):
            super().update(n)
            seen.append((self.done / self.total, self.elapsed(), self.eta()))

    try:
        with Watch("step 1 of 1: 11 configurations", work * len(configs), unit, clock=clock, bar=False) as bar:
            evaluator.evaluate_many(configs, bar)
    finally:
        for handle in handles:
            handle.remove()
    real = clock.now
    assert seen[-1][0] == pytest.approx(1.0)  # every unit of work counted, none twice
    ratios = [(elapsed + eta) / real for fraction, elapsed, eta in seen if fraction >= 0.1]
    assert len(ratios) > 20 and 0.5 <= min(ratios) and max(ratios) <= 2.0, (min(ratios), max(ratios))


def test_a_phase_that_cannot_count_says_it_is_still_running(caplog):
    caplog.set_level(logging.INFO, "search.progress")
    with progress.phase("writing model shards", every=0.05):
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "writing model shards ..." and lines[-1].startswith("writing model shards: done in")
    assert any(line.startswith("still writing model shards") for line in lines[1:-1])


def test_progress_line_names_the_step_the_units_and_the_time_left():
    now = [0.0]
    bar = progress.Progress("beam step 2 of 4: 9 configurations", 1000, "token", clock=lambda: now[0], bar=False)
    now[0] = 30.0
    bar.update(250)
    assert bar.line() == "beam step 2 of 4: 9 configurations: 25% (250 of 1.0k tokens), 30s so far, about 1m30s left"


def test_a_configuration_s_share_of_the_step_follows_the_blocks_it_ran():
    class Scores:
        def __init__(self, n):
            self.scores = {"t": type("S", (), {"n": n})()}

    task = type("T", (), {"examples": [0] * 10})()
    shares = progress.shares({(): Scores(10), (0,): Scores(10), (5,): Scores(10), (4,): Scores(5)}, [task], 6)
    # blocks run + 1: baseline 7, (0,) 6, (5,) 1, (4,) 2 x half the examples = 1
    assert shares[()] == pytest.approx(7 / 15) and shares[(5,)] == pytest.approx(1 / 15)
    assert shares[(4,)] == pytest.approx(shares[(5,)]) and sum(shares.values()) == pytest.approx(1)


def test_speedup_interval_and_its_warnings():
    rng = np.random.default_rng(0)
    dense = list(1.0 + rng.normal(0, 0.01, 20))
    steady = speedup.ratio_interval(dense, [d / 1.05 for d in dense])
    assert steady[0] == pytest.approx(1.05) and speedup.tight(steady)
    assert speedup.warnings_for("prefill", steady, 1.07, 20, 30) == []
    noisy = speedup.ratio_interval(list(rng.uniform(0.7, 7.4, 6)), list(rng.uniform(0.5, 1.5, 6)))
    warned = speedup.warnings_for("prefill", noisy, 1.07, 6, 6)
    assert not speedup.tight(noisy) and any("unreliable" in w for w in warned)
    assert any("above 1.07x" in w for w in warned) == (noisy[0] > 1.07)


def test_an_output_folder_inside_a_checkout_is_kept_out_of_git(tmp_path):
    (tmp_path / ".git").mkdir()
    inside, outside = tmp_path / "pruned-smollm2", tmp_path.parent / f"{tmp_path.name}-out"
    for folder in (inside, outside):
        folder.mkdir()
        cli.ignore_in_checkout(str(folder))
    assert (inside / ".gitignore").read_text().splitlines()[-1] == "*" and not (outside / ".gitignore").exists()
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        (inside / "model.safetensors").write_text("weights")
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path, capture_output=True, text=True
        )
        assert "pruned-smollm2" not in status.stdout


# --------------------------------------------------------------------------- a real search on a real server


@pytest.fixture(scope="module")
def searched(tiny_model_dir, store_template, tmp_path_factory):
    """A sensitivity study then a beam search of a tiny 6-block model, then the same beam search
    again; (store path, client, [first parent, rerun parent])."""
    path = tmp_path_factory.mktemp("searched") / "mlflow.db"
    uri, client = copy_store(store_template, path)
    model = tiny_model_dir(layers=N_BLOCKS, initializer_range=0.3)
    common = ["--model", model, "--tasks", ",".join(TASKS), "--n_samples", "4", "--batch_size", "16", "--tracking_uri", uri]
    assert run_main(sensitivity.main, common) == 0
    search = [*common, "--beam_width", "2", "--max_removed", "2", "--retry_delay", "0"]
    assert run_main(beam.main, search) == 0
    assert run_main(beam.main, search) == 0
    return path, client, runs(client, names.BEAM_SEARCH, "FINISHED")


def test_every_study_run_describes_itself_and_a_rerun_says_it_reused_everything(searched):
    _, client, (first, rerun) = searched
    note = first.data.tags[names.DESCRIPTION]
    assert "| k | removed blocks | mean drop ± std | pydoc_ppl (Δ log-ppl) | pydoc_cloze (Δ acc) |" in note
    results = BeamResults.from_json(tracking.load_json(client, first.info.run_id, names.BEAM_RESULTS))
    best = results.recommendations[1]
    row = f"| 2 | {','.join(map(str, best.removed_blocks))} | {best.mean_drop:.4f} ± {best.std_drop:.4f} |"
    assert row in note and "n=4 per task" in note
    assert names.REUSED_ALL not in first.data.tags
    assert rerun.data.tags[names.REUSED_ALL] == "true" and rerun.data.tags[names.DESCRIPTION].startswith("> **Nothing was scored")
    (study,) = runs(client, names.SENSITIVITY, "FINISHED")
    assert "(most)" in study.data.tags[names.DESCRIPTION] and "Baseline (nothing removed)" in study.data.tags[names.DESCRIPTION]


def test_configuration_runs_carry_their_own_time_and_sort_by_block_or_by_drop(searched):
    _, client, (first, _) = searched
    children = runs(client, names.CONFIG, "FINISHED")
    by_name = {r.info.run_name: r for r in children}
    assert {f"remove[{b}]" for b in range(N_BLOCKS)} | {"baseline"} <= set(by_name)  # sensitivity: by block
    baseline, deepest = by_name["baseline"], by_name[f"remove[{N_BLOCKS - 1}]"]
    assert baseline.data.metrics["elapsed_s"] > deepest.data.metrics["elapsed_s"] > 0  # all blocks vs none after it
    step2 = tracking.load_json(client, first.info.run_id, names.beam_step(2))
    ranked = sorted(
        (c for c in step2["candidates"] if c["status"] == "FINISHED"), key=lambda c: (c["mean_drop"], c["removed_blocks"])
    )
    names_in_order = [client.get_run(c["run_id"]).info.run_name for c in ranked]
    assert names_in_order == sorted(names_in_order), [(n, c["mean_drop"]) for n, c in zip(names_in_order, ranked)]
    assert names_in_order[0].startswith("step2 #") and names_in_order[0].endswith(
        f"remove[{','.join(map(str, ranked[0]['removed_blocks']))}]"
    )


def test_beam_drops_figure_is_titled_labelled_and_splits_units(tmp_path):
    entries = [
        {"num_removed": k, "removed_blocks": blocks, "mean_drop": 0.1 * k, "std_drop": 0.05, "n_datasets": 2,
         "incremental_drop": 0.1, "num_active_blocks": 6 - k, "active_blocks": [], "drops": {"ppl": 0.2 * k, "mc": 0.01 * k},
         "config_hash": "h", "run_id": "r", "complete": True}
        for k, blocks in ((1, [4]), (2, [3, 4]))
    ]  # fmt: skip
    results = BeamResults.from_json(
        {"model": "org/Tiny-1B", "tasks": ["ppl", "mc"], "num_blocks": 6, "settings": {"beam_width": 2, "criterion": "mean"},
         "baseline": {"ppl": {"ppl": 10.0}, "mc": {"acc": 0.5}}, "baseline_run_id": "b", "recommendations": entries,
         "num_active_blocks": {}, "per_task": {}, "failed": [], "worker": {}}
    )  # fmt: skip
    fig = figures.plot_beam_drops(results, {"n_samples": 4}, tmp_path / "beam_drops.png")
    assert (tmp_path / "beam_drops.png").stat().st_size > 0
    assert "Tiny-1B" in fig._suptitle.get_text() and "ppl, mc" in fig._suptitle.get_text() and "n=4" in fig._suptitle.get_text()
    axes = fig.get_axes()
    assert [a.get_ylabel() for a in axes] == ["Δ log-ppl", "Δ acc", "mean drop"]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0\nnone", "1\n[4]", "2\n[3,4]"]


# --------------------------------------------------------------------------- the MLflow UI, in a browser


def chromium() -> str:
    """The Chromium binary, installed with apt-get where it is missing (CI machines start bare)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=600)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("no Chromium, and it cannot be installed here (needs apt-get as root): the UI screenshot is not taken")
    return found


def browse(browser: str, url: str, tmp_path, *what: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` with a fresh profile, the page's scripts given 20 s of virtual time."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,2600",
        "--virtual-time-budget=20000",
    ]
    return subprocess.run([browser, *flags, *what, url], capture_output=True, text=True, timeout=180)


@pytest.mark.service
def test_the_mlflow_ui_shows_the_recommendation_table_on_the_run_page(searched, tmp_path):
    path, _, (first, _) = searched
    browser = chromium()  # installed first: a server is not kept waiting for apt-get
    with mlflow_server(f"sqlite:///{path}", str(tmp_path / "artifacts")) as server:
        page = f"{server}/#/experiments/{first.info.experiment_id}/runs/{first.info.run_id}"
        dom = browse(browser, page, tmp_path, "--dump-dom")
        shot = tmp_path / "run_page.png"
        done = browse(browser, page, tmp_path, f"--screenshot={shot}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<table" in dom.stdout and "mean drop ± std" in dom.stdout and "removed blocks" in dom.stdout
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
    keep = os.environ.get("PRUNETRACK_SCREENSHOTS")  # where to keep it for a look
    if keep:
        shutil.copy(shot, keep)
