"""The `taylor_study` entry point: Optuna-driven Taylor parameter studies, a grid or TPE over the `prune`
settings, every trial a tracked run.

    python -m search.study --config quick [--storage URL|profile] [--study_name S] [--n_trials N] [--report_only true]

A study config (`mlruns_config/studies/<name>.yaml`) holds fixed pruning options, the search space,
the objective metric(s), `n_trials` and the Optuna storage. Starting the same command again resumes
the study; starting it N times at once makes N workers share it. Each trial is a `prunetrack.kind=prune`
child run of the study's parent run, in the parent's experiment. When a worker finds nothing left to
do, the parent run gets `search_results.csv` and Optuna's plots.

The study's parts: search.study_spec (the config and its checks), search.study_storage (the Optuna
storage, creating or joining the study and its parent run), search.trial_runner (the trials and the
workers' coordination), search.study_report (the results table, plots and summary). This module runs the
settings (search.settings.StudySettings); it loads neither torch nor Optuna before the arguments are read.
"""

from __future__ import annotations

import os

from contract import cli, names, tracking
from search.settings import StudySettings
from search.settings import study_parser as parser


def main(argv=None) -> None:
    """Run the study as one of its workers until nothing is left for it, then report; or only report."""
    settings = cli.settings_from(StudySettings, parser().parse_args(argv))
    from search import monitoring, study_report, study_spec, study_storage, trial_runner  # after the arguments

    spec = study_spec.load_spec(settings.config, settings.storage, settings.study_name, settings.n_trials)
    client = tracking.connect(settings.tracking_uri or None)
    storage = study_storage.open_storage(spec)
    if settings.report_only:
        study = study_storage.load_existing(spec, storage)
    else:
        study, _ = study_storage.open_study(spec, storage, client)
    setup = study_storage.study_setup(study)
    parent = setup["parent_run_id"]
    own = os.environ.get("MLFLOW_RUN_ID") or parent  # this worker's run: its own under `mlflow run`, else the parent
    with monitoring.system_metrics(client, own, settings.system_metrics):
        evaluated = None if settings.report_only else trial_runner.run_worker(study, spec, client, parent)
    if evaluated is not None and own != parent:
        tracking.describe(
            client, own, f"Worker of Taylor study {spec.name!r} (parent run `{parent}`): evaluated {evaluated} trials."
        )
    table = study_report.write_report(client, study, setup)
    if evaluated is not None:
        if names.ERROR in client.get_run(parent).data.tags:  # an earlier start was stopped; this one finished
            client.delete_tag(parent, names.ERROR)
        client.set_terminated(parent, "FINISHED")
    print(study_report.summary(spec, study, table, setup, evaluated))


if __name__ == "__main__":
    cli.check_args(parser)  # `--help` and a bad argument are answered before torch loads
    from search.cli import run_main

    raise SystemExit(run_main(main))
