"""Racing: stop scoring a configuration once the data seen so far shows it cannot enter the beam.

After each look (see pruning.evaluate.look_sizes), for every pair of configurations still
running, the difference of their ranking values (drop averaged over the tasks, or on one task)
is estimated from the paired per-example differences seen so far: a stratified mean over the
tasks, with the sample variance of the paired differences and the finite-population correction
(the examples seen are a seeded random sample, without replacement, of the task's examples).
A configuration stops when at least `width` others are better, each with one-sided confidence
1 - alpha / (beams x width x (candidates - width) x looks), a normal bound. Why that correction:
a wrong stop removes a configuration of the true top `width`, and it needs at least one false claim
"r is better than c" with c in the true top and r outside it (only width - 1 others are truly
better than c); there are width x (candidates - width) such pairs per beam and look, so by the
union bound over them, the beams and the looks that can stop (all but the last, at full data) the
probability of any wrong stop in a step is at most alpha under the normal approximation.
`candidates` counts every candidate of the beam in the step, stopped ones included: the family
is fixed before any data is seen (the survivors of a look are chosen by the data, and testing
fewer of them at a laxer level would not be bounded by the union bound). Why this
bound: it uses the pairing (the same examples under both configurations, so the per-example noise
shared by them cancels), it is exact at full data (the correction goes to zero), and unlike a
Hoeffding bound it needs no range for per-document perplexity terms. Its normal approximation is
why no configuration stops before MIN_LOOK_EXAMPLES examples of each task. Survivors are scored
on all the data, so kept and recommended configurations carry exact numbers; a wrong stop can only
drop a configuration from the beam, and the benchmark checks the recommendations against an
exhaustive search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from pruning.drop import RACING_ALPHA, example_terms
from pruning.evaluate import MIN_LOOK_EXAMPLES
from pruning.units import label, normalize


@dataclass
class Beam:
    """One beam of a step: how it ranks (weight per task) and the configurations competing in it."""

    weights: dict[str, float]  # task name -> weight in the ranking value (mean: 1/T each)
    members: set  # configurations, in any form pruning.units.normalize takes; kept normalized

    def __post_init__(self):
        self.members = {normalize(c) for c in self.members}


@dataclass
class Race:
    """Stop rules for one step: its beams, how many each keeps, and the error level."""

    beams: list[Beam]
    width: int
    alpha: float = RACING_ALPHA

    def stop(self, evaluator, lls: dict) -> dict[tuple, str]:
        """Configurations (keys of `lls`: per task, example -> request log-likelihoods) to stop now,
        with the reason: out of every beam they compete in."""
        out, kept = {}, set()
        for beam in self.beams:
            members = [c for c in lls if normalize(c) in beam.members]
            out_here = self._out_of(beam, members, evaluator, lls) if len(members) > self.width else {}
            kept.update(c for c in members if c not in out_here)
            for c, reason in out_here.items():
                out.setdefault(c, reason)
        return {c: reason for c, reason in out.items() if c not in kept}

    def z(self, tests: int) -> float:
        """The one-sided normal quantile each comparison is held to: alpha shared by `tests` (Bonferroni)."""
        return float(norm.isf(self.alpha / tests))

    def _out_of(self, beam: Beam, members: list, evaluator, lls: dict) -> dict:
        diff = np.zeros((len(members), len(members)))
        var = np.zeros_like(diff)
        seen_text = []
        for t, task in enumerate(evaluator.tasks):
            weight = beam.weights.get(task.name, 0.0)
            if not weight:
                continue
            seen = sorted(lls[members[0]][t])
            n, total = len(seen), len(evaluator.tokens[t])
            if n < min(MIN_LOOK_EXAMPLES, total):
                return {}
            losses = np.array([_losses(task, [lls[c][t][e] for e in seen], seen, evaluator.tokens[t]) for c in members])
            mean = losses.mean(axis=1)
            diff += weight * (mean[:, None] - mean[None, :])
            if n > 1 and n < total:
                cov = np.atleast_2d(np.cov(losses))
                pair_var = np.diag(cov)[:, None] + np.diag(cov)[None, :] - 2 * cov
                var += weight**2 * pair_var / n * (1 - n / total)
            seen_text.append(f"{n}/{total} {task.name}")
        # the family fixed before the step (module docstring): the beam's candidates, stopped ones included
        tests = len(self.beams) * self.width * (len(beam.members) - self.width) * max(1, evaluator.n_looks - 1)
        z = self.z(tests)
        worse = diff - z * np.sqrt(np.maximum(var, 0)) > 0  # worse[c, r]: c worse than r, confidently
        out = {}
        for i, c in enumerate(members):
            better = [j for j in np.flatnonzero(worse[i])]
            if len(better) >= self.width:
                closest = min(better, key=lambda j: diff[i, j])
                out[c] = (
                    f"worse than {len(better)} others (closest {label(members[closest])} by "
                    f"{diff[i, closest]:.4f} +- {z * np.sqrt(var[i, closest]):.4f}) after {', '.join(seen_text)} "
                    f"examples; normal bound, alpha {self.alpha} / {tests} (beams x width x (candidates - width) x looks)"
                )
        return out


def _losses(task, lls: list[np.ndarray], examples: list[int], tokens: list[int]) -> np.ndarray:
    """Each example's term of the task's drop (pruning.drop.example_terms) from its request
    log-likelihoods: correct or not for multiple choice, its NLL for perplexity."""
    if task.kind == "multiple_choice":
        return example_terms(task.kind, [np.argmax(ll) == task.examples[e].gold for ll, e in zip(lls, examples)])
    return example_terms(task.kind, [-ll.sum() for ll in lls], tokens)
