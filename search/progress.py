"""Progress a user can trust on every long step: what runs, how far it is, how long is left.

Work is counted in units of even cost (padded tokens through the model, not requests, which the
scorer runs longest first), so the estimate, the time so far scaled by the work left, holds from
the first few percent on. On a terminal a tqdm bar shows it; elsewhere (logs of `mlflow run`, CI)
a line is logged every `EVERY` seconds. A `phase` that cannot count its work (writing shards,
timing models) logs when it starts, every `EVERY` seconds while it runs, and when it ends: no
silent minute.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

from pruning.units import first_block, normalize, removed_blocks

logger = logging.getLogger(__name__)

EVERY = 30.0  # seconds between progress lines when no bar is shown


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts `total` units of work (`unit`) under `label`; `update(n)` as work is done (the
    scorer's `progress` argument). `eta()` is the time so far times the work left over the work done."""

    def __init__(self, label: str, total: int, unit: str, clock=time.monotonic, bar: bool | None = None):
        self.label, self.total, self.unit, self.clock = label, max(1, int(total)), unit, clock
        self.done = 0
        self.start = self.last_line = clock()
        show_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None
        if show_bar:
            from tqdm import tqdm

            # smoothing=0: tqdm's estimate is the same average-rate one as eta()
            self.bar = tqdm(total=self.total, desc=label, unit=unit, unit_scale=True, smoothing=0, leave=False)
        else:
            logger.info(f"{label}: {_count(self.total)} {unit}s of work")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.clock() - self.last_line >= EVERY:
            self.last_line = self.clock()
            logger.info(self.line())

    def elapsed(self) -> float:
        return self.clock() - self.start

    def eta(self) -> float | None:
        """Seconds left, from the average rate so far; None before any work is done."""
        if not self.done:
            return None
        return self.elapsed() * max(0, self.total - self.done) / self.done

    def line(self) -> str:
        """`<label>: 12% (1.2M of 10M tokens), 0m45s so far, about 5m30s left`."""
        eta = self.eta()
        left = f", about {duration(eta)} left" if eta is not None else ""
        return (
            f"{self.label}: {100 * self.done / self.total:.0f}% ({_count(self.done)} of {_count(self.total)} "
            f"{self.unit}s), {duration(self.elapsed())} so far{left}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _count(n: int) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


@contextlib.contextmanager
def repeating(seconds: float, action):
    """Call `action()` every `seconds` in a background thread while the block runs; stopped and
    joined on exit (a heartbeat, a watch for dead workers' claims, a still-running line)."""
    stop = threading.Event()

    def loop():
        while not stop.wait(seconds):
            action()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def phase(label: str, every: float = EVERY):
    """Log `label...` on entry, `still <label> (Ns)` every `every` seconds while it runs, and
    `<label>: done in Ns` on exit: for steps that cannot count their work."""
    start = time.monotonic()
    logger.info(f"{label} ...")
    with repeating(every, lambda: logger.info(f"still {label} ({duration(time.monotonic() - start)} so far)")):
        yield
    logger.info(f"{label}: done in {duration(time.monotonic() - start)}")


def work_of(evaluator) -> tuple[int, str]:
    """(units of work of scoring one configuration on all the data, the unit's name): padded tokens
    for the log-likelihood scorer, examples for generation."""
    tokens = getattr(evaluator, "n_tokens", None)
    return (tokens, "token") if tokens is not None else (evaluator.n_requests, "example")


def blocks_run(removed, num_blocks: int) -> int:
    """Blocks a configuration runs itself in step-wide scoring: those from its first touched block on
    that it keeps whole or in part (the blocks below come from the kept states of the shared pass); all
    for the baseline."""
    config = normalize(removed)
    return num_blocks - (first_block(config) or 0) - len(removed_blocks(config))


def shares(results: dict, tasks, num_blocks: int) -> dict:
    """Each configuration's share of a step's time: examples it was scored on (all, or those seen
    before racing stopped it) times the blocks it ran plus one (embedding and head), normalized."""
    total = sum(len(t.examples) for t in tasks)
    weights = {}
    for removed, result in results.items():
        seen = sum(s.n for s in result.scores.values()) / total if result.scores else 1.0
        weights[removed] = seen * (blocks_run(removed, num_blocks) + 1)
    norm = sum(weights.values()) or 1.0
    return {removed: w / norm for removed, w in weights.items()}
