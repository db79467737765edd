"""Running a Taylor study's trials: one prune run per trial, workers coordinated through claims.

In a grid study workers only run enqueued trials; taking one is atomic on RDB storage, so no point
is evaluated twice. A trial that finds the queue empty (another worker took the last point between
look and take) ends PRUNED without evaluating anything. A worker claims each trial it runs in the
claims table beside the study (search.work.Claims). A RUNNING trial whose claim's owner is gone
(same machine: its process exited; another machine: no heartbeat for STALE_S seconds) is failed by
the next worker that looks, at once; its MLflow run is marked KILLED and its point enqueued again
(`max_retry`). A trial stopped by Ctrl-C is marked the same way by its own worker. Workers wait
for the running trials of others before they stop, so a survivor redoes a dead worker's trial.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
import warnings
from dataclasses import asdict, replace

import optuna
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from contract import names, tracking
from search.cli import USER_ERRORS, SearchError
from search.prune import prune_and_evaluate
from search.study_spec import StudySpec
from search.study_storage import SETUP_ATTR
from search.work import POLL_S, RUNNING, STALE_S, Claims, free_memory

logger = logging.getLogger(__name__)


def retry_callback(max_retry: int | None = None) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that enqueues a stopped trial's parameters again (at most `max_retry` times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def redo_trial(client, study: optuna.Study, trial, reason: str, max_retry: int | None) -> None:
    """A trial whose worker stopped: mark its MLflow run KILLED with `reason`, enqueue its point again."""
    parent = study.user_attrs.get(SETUP_ATTR, {}).get("parent_run_id")
    for run in trial_runs(client, parent) if parent else []:
        if run.data.tags.get(names.TRIAL_NUMBER) == str(trial.number) and run.info.status == "RUNNING":
            tracking.kill(client, run.info.run_id, f"{reason}; trial redone")
    retry_callback(max_retry)(study, trial)


def trial_key(study: optuna.Study, number: int) -> str:
    """The claim of trial `number` in the claims table."""
    return f"optuna:{study.study_name}:{number}"


def trial_runs(client, parent: str) -> list:
    """The trial runs under a study's parent run, oldest first."""
    exp_id = client.get_run(parent).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent}' and tags.`{names.KIND}` = '{names.PRUNE}'"
    return client.search_runs([exp_id], query, max_results=50000, order_by=["attributes.start_time ASC"])


class TrialRunner:
    """The objective: one prune run per trial, a child of the study's parent run."""

    def __init__(self, spec: StudySpec, client, parent: str, claims: Claims):
        self.spec, self.client, self.parent, self.claims = spec, client, parent, claims
        self.exp_id = client.get_run(parent).info.experiment_id
        tracking.in_flight(client, self.exp_id)  # a stop ends this worker's trial runs KILLED
        self.fatal: BaseException | None = None  # a user error: stops this worker after the trial is recorded
        self.evaluated = 0

    def __call__(self, trial: optuna.Trial):
        """Evaluate one trial as a claimed prune run; its objective value(s)."""
        if self.spec.sampler == "grid" and "grid_point" not in trial.user_attrs:
            raise optuna.TrialPruned("no grid point left: another worker took the last one")
        client, name, run_id = self.client, self.spec.name, None
        key = trial_key(trial.study, trial.number)
        if not self.claims.take(key, None):  # a new trial number; a row left by a deleted study of the same name
            self.claims.take(key, self.claims.rows([key]).get(key))
        try:
            point = self.spec.suggest(trial)
            settings = replace(self.spec.settings, **point)
            run_id = client.create_run(
                self.exp_id,
                run_name=f"{name}-trial-{trial.number}",
                tags={
                    MLFLOW_PARENT_RUN_ID: self.parent,
                    names.KIND: names.PRUNE,
                    names.STUDY_NAME: name,
                    names.TRIAL_NUMBER: str(trial.number),
                    names.HOST: socket.gethostname(),
                    names.PID: str(os.getpid()),
                },
            ).info.run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            given = {k: v for k, v in asdict(settings).items() if str(v) != ""}  # unset options show as absent, not ''
            tracking.log(client, run_id, params={**given, "study_name": name, "trial_number": trial.number})
            self.evaluated += 1
            shown = ", ".join(f"{k}={v}" for k, v in point.items())
            logger.info(f"study {name!r} ({self.spec.n_trials} trials): trial #{trial.number}, {shown}")
            metrics = prune_and_evaluate(client, run_id, self.exp_id, settings)
            missing = [m for m in self.spec.objectives if m not in metrics]
            if missing:
                raise SearchError(f"objective {missing[0]!r} was not logged; logged: {', '.join(sorted(metrics))}")
        except Exception as err:
            if run_id:
                tracking.fail(client, run_id, err)
            trial.set_user_attr("error", tracking.error_tag(err))
            self.claims.settle(key, tracking.error_tag(err))
            if isinstance(err, USER_ERRORS):
                self.fatal = err
            raise
        except BaseException as err:  # Ctrl-C, SIGTERM: the point goes back to the queue
            if run_id:
                tracking.kill(client, run_id, f"{tracking.error_tag(err)}; trial redone")
            frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
            retry_callback()(trial.study, frozen)
            self.claims.settle(key, tracking.error_tag(err))
            raise
        finally:
            free_memory()
        client.set_terminated(run_id, "FINISHED")
        self.claims.settle(key)
        values = [metrics[m] for m in self.spec.objectives]
        return values if len(values) > 1 else values[0]


def uses_budget(trial) -> bool:
    """Whether a finished trial uses up the budget: it completed, or its evaluation failed with an error."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def fail_stopped_trials(study: optuna.Study, claims: Claims, client, max_retry: int | None) -> int:
    """Fail the RUNNING trials whose worker is gone, by their claims (search.work.Claims.alive: same
    machine, process exited: at once; another machine: no heartbeat for STALE_S s), and redo them
    (run KILLED, point enqueued again); how many. The claim is taken over first, so one worker does it."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    rows = claims.rows([trial_key(study, t.number) for t in running])
    failed = 0
    for trial in running:
        key, claim = trial_key(study, trial.number), rows.get(trial_key(study, trial.number))
        if claim is None:  # its worker stopped between taking the trial and claiming it, or is about to claim it
            if time.time() - trial.datetime_start.timestamp() < STALE_S:
                continue
            reason = f"worker stopped before claiming the trial (no claim after {STALE_S} s)"
        elif claim.status != RUNNING or claims.alive(claim):
            continue
        else:
            host, pid, _ = claim.owner.rsplit(":", 2)
            reason = (
                f"worker process {host}:{pid} died"
                if host == socket.gethostname()
                else f"worker {host}:{pid} sent no heartbeat for {STALE_S} s"
            )
        if not claims.take(key, claim):
            continue  # another worker took it over first
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # its worker finished it meanwhile
            claims.settle(key)
            continue
        redo_trial(client, study, copy.deepcopy(study._storage.get_trial(trial._trial_id)), reason, max_retry)
        claims.settle(key, reason)
        failed += 1
    return failed


def work(study: optuna.Study, spec: StudySpec, runner: TrialRunner) -> None:
    """Run trials until the study has none left for this worker, waiting for other workers' running trials
    (a stopped one is failed and enqueued again). A user error stops the worker after its trial is recorded."""
    told = False
    while True:
        fail_stopped_trials(study, runner.claims, runner.client, spec.max_retry)
        trials = study.get_trials(deepcopy=False)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if sum(map(uses_budget, trials)) + running >= spec.n_trials or (spec.sampler == "grid" and not waiting):
            if not running:
                return
            if not told:
                logger.info(f"waiting for {running} trial(s) of other workers")
                told = True
            time.sleep(POLL_S)
            continue
        study.optimize(runner, n_trials=1, catch=(Exception,))
        if runner.fatal:
            raise runner.fatal


def _stop_parent(client, study: optuna.Study, parent: str, err: BaseException) -> None:
    """A worker stopped by an error, Ctrl-C or SIGTERM: when no other worker has a trial running, the parent
    run ends KILLED or FAILED with the reason (the next start, or a surviving worker, finishes it)."""
    try:
        if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
            return
    except Exception:  # the storage is not answering: leave the parent to the next start
        return
    tracking.fail(client, parent, err)


def run_worker(study: optuna.Study, spec: StudySpec, client, parent: str) -> int:
    """This worker's trials of the study (`work`), each claimed; how many it evaluated. Stopped by an error,
    Ctrl-C or SIGTERM, it ends the parent run when no other worker has a trial running."""
    with Claims(spec.storage) as claims:
        runner = TrialRunner(spec, client, parent, claims)
        try:
            work(study, spec, runner)
        except BaseException as err:
            _stop_parent(client, study, parent, err)
            raise
    return runner.evaluated
