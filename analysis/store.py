"""Queries of the tracking store shared by the analyses: experiments, runs by kind, JSON artifacts.

Reads only what the jobs in `search` log (see docs/contract.md, the tracking contract); never loads a model.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from contract import tracking
from contract.names import KIND
from contract.records import Record, RecordError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per small JSON file clutters the logs


class AnalysisError(ValueError):
    """What the user asked for cannot be analysed with what the store holds."""


def _pages(call, **kwargs) -> list:
    """Every item of a paged MLflow search."""
    items, token = [], None
    while True:
        page = call(page_token=token, **kwargs)
        items += list(page)
        token = page.token
        if not token:
            return items


def experiment_ids(client: MlflowClient, experiment: str = "") -> list[str]:
    """Ids of every experiment, or of the one named (or numbered) `experiment`."""
    if not experiment:
        return [e.experiment_id for e in _pages(client.search_experiments, max_results=1000)]
    found = client.get_experiment_by_name(experiment)
    if found is None and experiment.isdigit():
        try:
            found = client.get_experiment(experiment)
        except MlflowException:
            found = None
    if found is None:
        names = sorted(e.name for e in _pages(client.search_experiments, max_results=1000))
        raise AnalysisError(
            f"unknown experiment {experiment!r} in {client.tracking_uri}; experiments: {', '.join(names) or 'none'}"
        )
    return [found.experiment_id]


def runs(client: MlflowClient, kind: str, experiment: str = "", status: str | None = "FINISHED") -> list[Run]:
    """Runs tagged `prunetrack.kind=<kind>` (of one status, or any when None), newest first."""
    query = f"tags.`{KIND}` = '{kind}'" + (f" and attributes.status = '{status}'" if status else "")
    return _pages(
        client.search_runs,
        experiment_ids=experiment_ids(client, experiment),
        filter_string=query,
        max_results=1000,
        order_by=["attributes.start_time DESC"],
    )


def get_run(client: MlflowClient, run_id: str) -> Run:
    """The run `run_id`, or a one-line error."""
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise AnalysisError(f"no run {run_id!r} in {client.tracking_uri}") from None


def read_json(client: MlflowClient, run_id: str, path: str):
    """JSON artifact `path` of run `run_id`, or a one-line error naming both."""
    try:
        return tracking.load_json(client, run_id, path)
    except (MlflowException, OSError, ValueError) as err:
        raise AnalysisError(f"cannot read artifact {path!r} of run {run_id}: {str(err).strip().splitlines()[0][:200]}") from None


def read_record(client: MlflowClient, run_id: str, path: str, record: type[Record]):
    """JSON artifact `path` of run `run_id` as a `record` (contract.records), or a one-line error."""
    try:
        return record.from_json(read_json(client, run_id, path))
    except RecordError as err:
        raise AnalysisError(f"artifact {path!r} of run {run_id} is {err}") from None


def read_json_many(client: MlflowClient, items: list[tuple[str, str]]) -> list:
    """read_json of every (run_id, path), downloaded in parallel, in order."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda item: read_json(client, *item), items))
