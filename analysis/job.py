"""What every analysis job shares: its own MLflow run, one-line errors (its settings: analysis.settings).

An analysis writes its outputs into a temporary folder; `publish` then records them as one run tagged
`prunetrack.kind=<kind>` (the run `mlflow run` started, else a new one in experiment `analysis`),
logs the folder as the run's artifacts and copies it to `--output_dir` when given.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.store import AnalysisError
from contract import cli, tracking

EXPERIMENT = "analysis"


def publish(
    client: MlflowClient,
    kind: str,
    params: dict,
    write: Callable[[Path], None],
    output_dir: str = "",
    metrics: dict | None = None,
) -> str:
    """Record the files `write` puts into a temporary folder as the artifacts of an analysis run of `kind`; its run id."""
    with tempfile.TemporaryDirectory() as tmp:
        outputs = Path(tmp)
        write(outputs)
        with tracking.study_run(client, kind, EXPERIMENT, params) as (run_id, _):
            tracking.log(client, run_id, metrics=metrics or {})
            tracking.describe(client, run_id, description(kind, outputs, metrics or {}))
            client.log_artifacts(run_id, str(outputs))
        if output_dir:
            shutil.copytree(outputs, output_dir, dirs_exist_ok=True)
            cli.ignore_in_checkout(output_dir)
    return run_id


def description(kind: str, outputs: Path, metrics: dict) -> str:
    """The run's description: the job's Markdown report (`*.md`), else its text report, else its metrics; and its files."""
    reports = sorted(outputs.glob("*.md")) or sorted(outputs.glob("*report*.txt"))
    if reports:
        text = reports[0].read_text()
        body = text if reports[0].suffix == ".md" else f"```\n{text.strip()}\n```"
    else:
        body = "\n".join(f"- `{k}`: {v:.4g}" for k, v in metrics.items()) or "_no metrics_"
    files = ", ".join(f"`{p.relative_to(outputs)}`" for p in sorted(outputs.rglob("*")) if p.is_file())
    return f"### {kind}\n\n{body}\n\nFiles: {files}\n"


def run_main(main, argv=None) -> int:
    """Run `main(argv)` as an entry point (contract.cli.run_main); AnalysisError is a user error."""
    return cli.run_main(main, argv, (AnalysisError,))
