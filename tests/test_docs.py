"""README.md is a short guide and docs/ the reference, built by MkDocs from pages whose tables are generated
(docs/hooks.py) from the code and benchmarks/results."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_short_guide_without_dated_measurements():
    assert len(README) <= 15_000
    assert re.findall(r"\b20\d\d-\d\d\b", README) == []  # dated measurements live in docs/ or benchmarks/results
    for command in ("make demo", "make test", "make docs", "mlflow ui", ". .venv/bin/activate"):
        assert command in README, command


def test_the_readme_lists_every_entry_point_with_its_module():
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    rows = {m[0]: m[1] for m in re.findall(r"^\| `(\w+)` \| `([\w.]+)` \|", README, re.MULTILINE)}
    assert rows == {name: re.match(r"python -m ([\w.]+)", spec["command"]).group(1) for name, spec in entry_points.items()}


def test_every_docs_page_the_readme_links_exists():
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links and [link for link in links if not (ROOT / link).is_file()] == []


def test_a_marker_that_names_nothing_fails():
    h = hooks()
    for marker in ("<!-- parameters: no_such_entry -->", "<!-- include: benchmarks/results/none.md -->", "<!-- tables: x -->"):
        with pytest.raises(h.MarkerError):
            h.expand(f"text\n{marker}\n")
    assert h.expand("<!-- an ordinary comment -->") == "<!-- an ordinary comment -->"


def test_the_benchmark_tables_come_from_the_results():
    h = hooks()
    latest = (ROOT / "benchmarks" / "results" / "latest.md").read_text()
    page = h.expand((ROOT / "docs" / "benchmarks.md").read_text())
    assert latest in page
    replay = json.loads((ROOT / "benchmarks" / "results" / "racing_step.json").read_text())
    for rule, result in replay.items():
        if isinstance(result, dict) and "example_configs" in result:
            assert f"| {rule} | {result['example_configs']:,} of " in page, rule
    assert replay["date"] in page and replay["device"] in page


def test_the_contract_names_table_lists_every_constant_and_pattern():
    from contract import names

    table = hooks().names("contract")
    constants = {k: v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}
    assert [k for k, v in constants.items() if f"| `{k}` | `{v}` |" not in table] == []
    assert "| `headline_tag(task)` | `headline/<task>` |" in table and "| `beam_step(k)` | `beam_step<k>.json` |" in table


def test_the_docs_build_strictly(tmp_path):
    """What `make test` runs: a broken link or anchor, a page left out of the navigation or a marker that
    names nothing fails the build."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "site" / "parameters" / "index.html").read_text()
    assert (
        "<td><code>racing_alpha</code></td>" in page
        and "prunetrack_claims" in (tmp_path / "site" / "workers" / "index.html").read_text()
    )
    assert 'id="pruning.racing"' in (tmp_path / "site" / "api" / "pruning" / "index.html").read_text()
