"""What every analysis job shares: its command line, its own MLflow run, one-line errors.

An analysis writes its outputs into a folder; `publish` then records them as one run tagged
`prunetrack.kind=<kind>` (the run `mlflow run` started, else a new one in experiment `analysis`),
logs the folder as the run's artifacts and copies it to `--output_dir` when given.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.store import AnalysisError
from search import tracking

EXPERIMENT = "analysis"


def parser(description: str) -> argparse.ArgumentParser:
    """The options every analysis takes: the tracking store and an optional output folder."""
    p = tracking.ArgumentParser(description=description)
    p.add_argument("--tracking_uri", default="", help="tracking URI or profile (overrides MLFLOW_TRACKING_URI)")
    p.add_argument("--output_dir", default="", help="also write the outputs to this folder")
    return p


def publish(client: MlflowClient, kind: str, params: dict, outputs: Path, output_dir: str = "",
            metrics: dict | None = None) -> str:
    """Record the files in `outputs` as the artifacts of an analysis run of `kind`; its run id."""
    with tracking.study_run(client, kind, EXPERIMENT, params) as (run_id, _):
        tracking.log(client, run_id, metrics=metrics or {})
        client.log_artifacts(run_id, str(outputs))
    if output_dir:
        shutil.copytree(outputs, output_dir, dirs_exist_ok=True)
    return run_id


def run_main(main, argv=None) -> int:
    """Run `main(argv)`; a user error becomes one line `error: ...` on stderr and exit code 2.

    The same contract as search.cli.run_main (search.tracking.guarded), which cannot be imported here:
    search.cli pulls in the model side (pruning, torch), and analysis never does.
    """
    return tracking.guarded(main, argv, (AnalysisError,))
