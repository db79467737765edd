"""Evaluating configurations reliably: retries, out-of-memory recovery, and work split between
workers that share a storage database.

Workers claim a configuration by inserting its hash into table `prunetrack_claims` of the shared
database (PostgreSQL, MySQL or SQLite, through SQLAlchemy); the primary key lets exactly one
insert win. A claim whose owner is gone (same host: its process has exited; another host: no
heartbeat for STALE_S seconds) is taken over by an update conditioned on the row's version, which
again only one worker wins. Results live in the MLflow store: a worker that did not evaluate a
configuration waits until its claim is settled and reads the FINISHED run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
import torch

from contract import names, schema, stores, tracking
from search import progress
from search.cli import SearchError
from search.configs import Outcome, StudyContext, evaluate_configs, lookup, run_label

logger = logging.getLogger(__name__)

TABLE = "prunetrack_claims"
RUNNING, DONE, FAILED = "running", "done", "failed"
HEARTBEAT_S = 30  # a worker refreshes the heartbeat of its claims this often
STALE_S = 300  # a claim from another host without a heartbeat for this long is taken over
POLL_S = 1.0  # how often a waiting worker looks at the claims


def storage_url(storage: str) -> sa.URL:
    """The SQLAlchemy URL of `storage`: a database URL, or a file path for an SQLite database."""
    if "://" not in storage:
        return sa.URL.create("sqlite", database=str(Path(storage).expanduser().resolve()))
    try:
        return sa.make_url(storage)
    except sa.exc.ArgumentError:
        raise SearchError(
            f"storage {storage!r} is not a database URL; allowed: postgresql://..., mysql://..., sqlite:///path, or a file path"
        ) from None


def engine_url(storage: str) -> sa.URL:
    """`storage_url` with the PostgreSQL driver named (contract.schema.engine_url)."""
    return schema.engine_url(storage_url(storage))


@dataclass(frozen=True)
class Claim:
    """A row of the claims table."""

    conf_hash: str
    owner: str  # host:pid:token
    status: str  # running, done or failed
    version: int
    heartbeat: float  # last sign of life, or when the claim was settled (epoch seconds)
    error: str | None


class Claims:
    """Exclusive claims on configurations in a database shared by the workers.

    Use it as a context manager: inside, a thread keeps this worker's claims alive; on exit,
    claims it still holds unsettled are released so that another worker takes them at once.
    """

    def __init__(self, storage: str):
        self.shown = storage_url(storage).render_as_string(hide_password=True)
        url = engine_url(storage)
        connect_args = {"timeout": 60} if url.get_backend_name() == "sqlite" else {}
        self.engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        self.table = sa.Table(
            TABLE,
            sa.MetaData(),
            sa.Column(names.CONFIG_HASH, sa.String(64), primary_key=True),
            sa.Column("owner", sa.String(300), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("heartbeat", sa.Double, nullable=False),
            sa.Column("error", sa.Text),
        )
        try:
            with schema.creation_lock(url):  # workers starting together: one creates the table
                self.table.metadata.create_all(self.engine)
        except sa.exc.SQLAlchemyError as err:
            raise SearchError(f"cannot use storage {self.shown!r}: {stores.first_line(err)}") from None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.started = time.time()
        self._held = contextlib.ExitStack()

    def __enter__(self) -> Claims:
        self._held.enter_context(progress.repeating(HEARTBEAT_S, self._beat))
        return self

    def __exit__(self, *exc) -> None:
        self._held.close()
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(sa.delete(t).where(t.c.owner == self.owner, t.c.status == RUNNING))
        self.engine.dispose()

    def _beat(self) -> None:
        """Refresh the heartbeat of this worker's running claims."""
        t = self.table
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.update(t).where(t.c.owner == self.owner, t.c.status == RUNNING).values(heartbeat=time.time()))
        except sa.exc.SQLAlchemyError as err:  # the next beat tries again
            logger.warning(f"claims heartbeat failed: {stores.first_line(err)}")

    def rows(self, hashes: list[str]) -> dict[str, Claim]:
        """The claims on `hashes` that exist, by hash."""
        t = self.table
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(t).where(t.c.config_hash.in_(hashes))).all()
        return {r.config_hash: Claim(r.config_hash, r.owner, r.status, r.version, r.heartbeat, r.error) for r in found}

    def take(self, conf_hash: str, current: Claim | None) -> bool:
        """Claim `conf_hash`, new or taken over from `current`; True when this worker won it."""
        t = self.table
        values = {"owner": self.owner, "status": RUNNING, "heartbeat": time.time(), "error": None}
        try:
            with self.engine.begin() as conn:
                if current is None:
                    conn.execute(sa.insert(t).values(config_hash=conf_hash, version=1, **values))
                    return True
                won = conn.execute(
                    sa.update(t)
                    .where(t.c.config_hash == conf_hash, t.c.version == current.version)
                    .values(version=current.version + 1, **values)
                )
                return won.rowcount == 1
        except sa.exc.IntegrityError:  # another worker inserted it first
            return False

    def settle(self, conf_hash: str, error: str | None = None) -> None:
        """Record this worker's claim on `conf_hash` as done, or failed with `error`."""
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(t)
                .where(t.c.config_hash == conf_hash, t.c.owner == self.owner)
                .values(status=FAILED if error else DONE, error=error, heartbeat=time.time(), version=t.c.version + 1)
            )

    def alive(self, claim: Claim) -> bool:
        """Whether the owner of a running claim may still be working on it."""
        host, pid, _ = claim.owner.rsplit(":", 2)
        if host != socket.gethostname():
            return time.time() - claim.heartbeat < STALE_S
        if int(pid) == os.getpid():
            return claim.owner == self.owner  # an earlier search of this process left it
        return tracking.process_alive(host, pid)


def free_memory() -> None:
    """Release what a failed evaluation left behind (host garbage, cached CUDA blocks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Worker:
    """Evaluates a study's configurations step-wide: retries failures, halves the batch size on
    CUDA out-of-memory, and with `claims` evaluates only what no other worker holds, taking up to
    `claim_size` configurations at a time and scoring them together."""

    def __init__(
        self,
        ctx: StudyContext,
        retries: int = 3,
        retry_delay: float = 60.0,
        claims: Claims | None = None,
        claim_size: int = 32,
    ):
        self.ctx = ctx
        self.retries, self.retry_delay, self.claims, self.claim_size = retries, retry_delay, claims, claim_size
        ctx.counts.setdefault("failed", 0)

    def run(self, configs: list[tuple[int, ...]], race=None, race_key: str | None = None) -> dict[tuple[int, ...], Outcome]:
        """Outcomes of all `configs`: evaluated here, reused from the store, or by other workers.
        With `race` (and `race_key`, the step's identity), configurations scored together race."""
        if self.claims is None:
            return self.evaluate(configs, race, race_key)
        hashes = {removed: self.ctx.hash_of(removed) for removed in configs}
        settled: dict[tuple[int, ...], Outcome] = {}
        told = False
        while len(settled) < len(configs):
            rows = self.claims.rows(list(hashes.values()))
            won = []
            for removed in [r for r in configs if r not in settled]:
                claim = rows.get(hashes[removed])
                if claim is not None and claim.status == DONE:
                    found = lookup(self.ctx, removed, race_key)
                    if found:
                        self.ctx.counts["reused"] += 1
                        settled[removed] = found
                        continue  # else the store lost it, or only a stop in another step is there: evaluate again
                elif claim is not None and claim.status == FAILED and claim.heartbeat >= self.claims.started:
                    settled[removed] = Outcome(removed, hashes[removed], error=claim.error)
                    continue  # failed while this worker ran; one that failed before is retried
                elif claim is not None and claim.status == RUNNING and claim.owner == self.claims.owner:
                    won.append(removed)  # taken over from a dead worker while this one scored (_taking_over)
                    continue
                elif claim is not None and claim.status == RUNNING and self.claims.alive(claim):
                    continue
                if len(won) < self.claim_size and self.claims.take(hashes[removed], claim):
                    self._close_orphans(claim)
                    won.append(removed)
            if won:
                others = [hashes[r] for r in configs if r not in settled and r not in won]
                with self._taking_over(others):
                    outcomes = self.evaluate(won, race, race_key)
                for removed, outcome in outcomes.items():
                    self.claims.settle(hashes[removed], outcome.error)
                    settled[removed] = outcome
            elif len(settled) < len(configs):
                if not told:
                    logger.info(f"waiting for {len(configs) - len(settled)} configurations held by other workers")
                    told = True
                time.sleep(POLL_S)
        return {removed: settled[removed] for removed in configs}

    def evaluate(self, configs: list[tuple[int, ...]], race=None, race_key: str | None = None) -> dict[tuple[int, ...], Outcome]:
        """Evaluate `configs` together (reusing FINISHED runs), retrying failures; a configuration
        that fails `retries + 1` times comes back with its error (its runs are FAILED).

        Hand-written rather than a retry library (tenacity and the like retry one call): each round
        retries only the configurations of the set that failed, counting attempts per configuration,
        and an out-of-memory error halves the batch size without counting as an attempt."""
        pending, done, failures = list(configs), {}, dict.fromkeys(configs, 0)
        while pending:
            try:
                outcomes = evaluate_configs(self.ctx, pending, race, race_key)
            except Exception as err:  # the whole set failed; Ctrl-C and exits pass
                free_memory()
                if isinstance(err, torch.cuda.OutOfMemoryError) and self.ctx.evaluator.batch_size > 1:
                    self._halve_batch()
                    logger.warning(
                        f"{tracking.error_tag(err)}; retrying {len(pending)} configurations "
                        f"with batch_size {self.ctx.evaluator.batch_size}"
                    )
                    continue
                error = tracking.error_tag(err)
                outcomes = {removed: Outcome(removed, self.ctx.hash_of(removed), error=error) for removed in pending}
            else:
                if any(o.error for o in outcomes.values()):
                    free_memory()
            retry = []
            for removed in pending:
                outcome = outcomes[removed]
                name = run_label(removed)
                if outcome.error is None:
                    done[removed] = outcome
                    continue
                failures[removed] += 1
                if failures[removed] > self.retries:
                    self.ctx.counts["failed"] += 1
                    logger.error(f"{name} failed {failures[removed]} times, recorded FAILED: {outcome.error}")
                    done[removed] = outcome
                else:
                    logger.warning(
                        f"{name} failed (attempt {failures[removed]} of {self.retries + 1}): {outcome.error}; "
                        f"retrying in {self.retry_delay:g} s"
                    )
                    retry.append(removed)
            pending = retry
            if pending:
                time.sleep(self.retry_delay)
        return {removed: done[removed] for removed in configs}

    def _halve_batch(self) -> None:
        """Score with half the batch size from now on."""
        self.ctx.evaluator = self.ctx.evaluator.with_batch_size(self.ctx.evaluator.batch_size // 2)

    @contextlib.contextmanager
    def _taking_over(self, hashes: list[str]):
        """While this worker scores its claimed set, take over at once (every POLL_S) the claims on
        `hashes` whose owner is gone (Claims.alive) and mark their runs KILLED; `run` scores them
        next. Step-wide scoring cannot add a configuration to a set already under way, so the
        takeover happens between two rounds of scoring, not after every claimed set of the step.
        A background look (search.progress.repeating), so that the scoring loop stays as it is."""

        def look() -> None:
            try:
                for claim in self.claims.rows(hashes).values():
                    if claim.status == RUNNING and not self.claims.alive(claim) and self.claims.take(claim.conf_hash, claim):
                        self._close_orphans(claim)
                        logger.info(f"took over configuration {claim.conf_hash} from {claim.owner}, whose process is gone")
            except Exception as err:  # the store or the claims table did not answer: the next look tries again
                logger.warning(f"looking for dead workers' claims failed: {stores.first_line(err)}")

        with progress.repeating(POLL_S, look):
            yield

    def _close_orphans(self, claim: Claim | None) -> None:
        """Mark the RUNNING runs that the dead owner of a taken-over claim left as KILLED."""
        if claim is None or claim.status != RUNNING:
            return
        host, pid, _ = claim.owner.rsplit(":", 2)
        for run in tracking.find_runs(self.ctx.client, claim.conf_hash, "RUNNING"):
            if (run.data.tags.get(names.HOST), run.data.tags.get(names.PID)) == (host, pid):
                tracking.kill(self.ctx.client, run.info.run_id, f"worker {claim.owner} stopped before finishing")


@contextlib.contextmanager
def shared_claims(storage: str):
    """Claims on the shared `storage` while a search runs; None when there is no storage."""
    if not storage:
        yield None
        return
    with Claims(storage) as claims:
        yield claims
