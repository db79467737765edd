"""Racing on one beam step at a size a whole beam search cannot afford on a CPU.

    python -m benchmarks.racing_step [--n 200] [--tasks piqa,arc_easy,hellaswag] [--alphas 0.05,0.5]

The first step of a beam search (every single-block removal of the default model, mean beam)
is scored on all the data once, step-wide. The step's race is then replayed on those
per-example results look by look, as `Evaluator.evaluate_many` runs it (a race's decisions
depend only on the per-example results at each look, so the replay stops exactly the
candidates a racing run stops), at each error level, and once with no multiplicity correction
(one-sided level alpha per comparison: not a guarantee, only a bound on what any corrected rule
can save). For each: example-configurations scored against the exhaustive step, candidates
stopped and at which look, and whether the beam kept is the exhaustive one. The ceiling is the
ratio when every candidate outside the beam stops at the first look. Prints JSON (the latest run
is kept in benchmarks/results/racing_step.json).
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
from scipy.stats import norm

from benchmarks.common import SCALE_TASKS, _stamp, real_tasks
from benchmarks.sensitivity import racing_ceiling
from contract import cli
from contract.cli import setting
from pruning.drop import drop
from pruning.evaluate import Evaluator
from pruning.models import load_model
from pruning.racing import Beam, Race
from pruning.tasks import load_task


class Uncorrected(Race):
    """The same stop rule with each comparison at level alpha: no bound on the step's error."""

    def z(self, tests: int) -> float:
        return float(norm.isf(self.alpha))


def per_example_values(score) -> dict[int, np.ndarray]:
    """A task score's per-example values in the form a race reads (example index -> request
    log-likelihoods; for perplexity, minus the document's NLL)."""
    if "loglikelihoods" in score.per_example:
        return {e: np.asarray(ll) for e, ll in enumerate(score.per_example["loglikelihoods"])}
    return {e: np.array([-nll]) for e, nll in enumerate(score.per_example["nll"])}


def replay(evaluator: Evaluator, lls: dict, race: Race, ranked: list, width: int) -> dict:
    """The race run look by look on the complete per-example results `lls` of the candidates
    `ranked` (best first): what it scores, what it stops and when, whether it keeps the best `width`."""
    active, scored, stopped_at, full = list(ranked), 0, [], sum(map(len, lls[ranked[0]]))
    for look in range(evaluator.n_looks - 1):
        seen = [
            [e for c in evaluator.chunks if c.task == t and c.look <= look for e in c.examples]
            for t in range(len(evaluator.tasks))
        ]
        views = {c: [{e: lls[c][t][e] for e in seen[t]} for t in range(len(seen))] for c in active}
        for c in race.stop(evaluator, views):
            active.remove(c)
            scored += sum(map(len, seen))
            stopped_at.append(look)
    scored += len(active) * full
    return {
        "example_configs": scored,
        "ratio": len(ranked) * full / scored,
        "stopped": len(stopped_at),
        "stopped_at_look": {str(look): stopped_at.count(look) for look in sorted(set(stopped_at))},
        "same_beam": sorted(active, key=ranked.index)[:width] == ranked[:width],
    }


@dataclasses.dataclass
class StepSettings:
    """The step to replay racing on."""

    n: int = setting(200, "examples per task")
    tasks: str = setting(",".join(SCALE_TASKS), "comma-separated real tasks; the builtin ones where their subsets are absent")
    data_dir: str = setting("", "folder with the tasks' JSONL; empty: $PRUNETRACK_DATA_DIR, else ../shared/data")
    beam_width: int = setting(3, "configurations kept by the step")
    alphas: str = setting("0.05,0.5", "racing_alpha values to replay")
    batch_size: int = setting(8, "requests per forward pass")


def main(argv=None) -> None:
    """Score the step, replay its race at each level, print the results as JSON."""
    parser = cli.parser_for(StepSettings, description=__doc__.split("\n")[0])
    args = cli.settings_from(StepSettings, parser.parse_args(argv))
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        alphas = []
    if not alphas or not all(0 < a < 1 for a in alphas):
        raise cli.UsageError(f"alphas {args.alphas!r}: each must be between 0 and 1 (exclusive)")
    names, folder = real_tasks(tuple(args.tasks.split(",")), args.data_dir or None)
    loaded = load_model("default", dtype="float32")
    tasks = [load_task(t, "validation", args.n, seed=0, data_dir=folder) for t in names]
    evaluator = Evaluator(loaded, tasks, args.batch_size)
    candidates = [(i,) for i in range(loaded.num_blocks)]
    start = time.perf_counter()
    scores = evaluator.evaluate_many([()] + candidates)
    seconds = time.perf_counter() - start
    lls = {c: [per_example_values(s.scores[t.name]) for t in tasks] for c, s in scores.items()}
    base = scores[()].scores
    mean_drop = {c: np.mean([drop(t, base[t.name].metrics, scores[c].scores[t.name].metrics) for t in tasks]) for c in candidates}
    ranked = sorted(candidates, key=lambda c: (mean_drop[c], c))  # the mean beam's order (search.beam.select)
    beam = [Beam({t.name: 1 / len(tasks) for t in tasks}, set(candidates))]
    looks = [sum(len(c.examples) for c in evaluator.chunks if c.look <= k) for k in range(evaluator.n_looks)]
    full, width = looks[-1], args.beam_width
    out = {
        "model": loaded.name,
        "tasks": {t.name: {"n": len(t.examples)} for t in tasks},
        **_stamp(loaded.device),
        "seconds_exhaustive_step": seconds,
        "candidates": len(candidates),
        "mean_drop": {",".join(map(str, c)): round(float(mean_drop[c]), 4) for c in ranked},
        "looks": looks,
        "ceiling": racing_ceiling(len(candidates) * full, [len(candidates)], width, full, looks[0]),
    }
    for alpha in alphas:
        out[f"racing_alpha={alpha}"] = replay(evaluator, lls, Race(beam, width, alpha), ranked, width)
    out["uncorrected, one-sided 0.05 per comparison"] = replay(evaluator, lls, Uncorrected(beam, width, 0.05), ranked, width)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    raise SystemExit(cli.run_main(main))
