"""What every analysis job shares: its own MLflow run, one-line errors (its settings: analysis.settings).

An analysis writes its outputs into a folder; `publish` then records them as one run tagged
`prunetrack.kind=<kind>` (the run `mlflow run` started, else a new one in experiment `analysis`),
logs the folder as the run's artifacts and copies it to `--output_dir` when given.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.store import AnalysisError
from contract import cli, tracking

EXPERIMENT = "analysis"


def publish(
    client: MlflowClient, kind: str, params: dict, outputs: Path, output_dir: str = "", metrics: dict | None = None
) -> str:
    """Record the files in `outputs` as the artifacts of an analysis run of `kind`; its run id."""
    with tracking.study_run(client, kind, EXPERIMENT, params) as (run_id, _):
        tracking.log(client, run_id, metrics=metrics or {})
        client.log_artifacts(run_id, str(outputs))
    if output_dir:
        shutil.copytree(outputs, output_dir, dirs_exist_ok=True)
    return run_id


def run_main(main, argv=None) -> int:
    """Run `main(argv)` as an entry point (contract.cli.run_main); AnalysisError is a user error."""
    return cli.run_main(main, argv, (AnalysisError,))
