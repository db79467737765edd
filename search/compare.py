"""Method selection for compare_methods: every chosen pruning method (criterion:procedure, DESIGN.md
"Units, criteria, procedures") selects the blocks to remove for k = 1..max_k on one split, and the
selections are scored on another split that shares no example with it.

Computing here, reading in analysis.compare_methods: this step logs a `method_selection` parent run
with every criterion's per-unit scores on the selection split (metrics `criterion/<name>`, step = block
index; `_attn`/`_mlp` for sublayers), what each criterion cost, and `method_selection.json` (each
method's configuration per k and the run that scored it). Selections and scores are configuration
runs found by their hash (search.configs), so a rerun reuses everything already measured.

Splits: `validation` (or `train`) is a whole file; `validation/a` and `validation/b` are its two
halves, drawn with `seed` (a seeded permutation of each task's examples, the first half `a`), each
then sampled to n_samples as usual. Selection and scoring examples never overlap (checked per task).
"""

from __future__ import annotations

from contract import cli
from search.settings import MethodSelectionSettings
from search.settings import method_selection_parser as parser

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load torch
    cli.check_args(parser)

import dataclasses
import logging
import math
import random
import time

from contract import names, tracking
from pruning.compile import use_compile
from pruning.evaluate import Evaluator
from pruning.models import load_model
from pruning.tasks import SPLITS, Task, load_task, parse_task_list, sample
from search import procedures
from search.cli import SearchError, run_main
from search.configs import StudyContext, study_identity
from search.work import Worker

logger = logging.getLogger(__spec__.name)
HALVES = ("a", "b")


def parse_methods(text: str) -> list[procedures.Method]:
    """Methods from `drop:beam,block_influence:one_shot,last_n`, checked (one-line errors)."""
    methods = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        criterion, _, procedure = part.rpartition(":") if ":" in part else ("", "", part)
        if procedure != procedures.LAST_N or criterion:
            if not criterion:
                raise SearchError(f"method {part!r} is not criterion:procedure; allowed: e.g. drop:beam, taylor:one_shot, last_n")
            procedures.check(criterion, procedure)
        methods.append(procedures.Method(criterion, procedure))
    if not methods:
        raise SearchError("methods is empty; allowed: comma-separated criterion:procedure pairs, e.g. drop:beam,last_n")
    return list(dict.fromkeys(methods))


def parse_split(text: str) -> tuple[str, str | None]:
    """(file split, half) from `validation`, `validation/a`, `train/b`."""
    split, _, half = text.partition("/")
    if split not in SPLITS or (half and half not in HALVES):
        allowed = ", ".join([*SPLITS, *(f"{s}/{h}" for s in SPLITS for h in HALVES)])
        raise SearchError(f"unknown split {text!r}; allowed: {allowed}")
    return split, half or None


def load_split(name: str, text: str, n_samples: int, ppl_docs: int, seed: int, data_dir: str, how: str) -> Task:
    """Task `name` on split `text` (a whole file or a seeded half of it), sampled to n_samples examples
    (ppl_docs documents for a perplexity task)."""
    split, half = parse_split(text)
    task = load_task(name, split, None, seed, data_dir or None, how)
    if half:
        order = list(range(len(task.examples)))
        random.Random(seed).shuffle(order)
        cut = (len(order) + 1) // 2
        keep = sorted(order[:cut] if half == "a" else order[cut:])
        task.examples = [task.examples[i] for i in keep]
        task.split = text
    task.examples = sample(task.examples, (ppl_docs if task.kind == "perplexity" else n_samples) or None, seed, how)
    if not task.examples:
        raise SearchError(f"task {name!r} has no examples in split {text!r}")
    return task


def check_splits(select: str, score: str) -> None:
    """Refuse a selection and a scoring split that overlap (the same file, unless its two halves)."""
    (a, half_a), (b, half_b) = parse_split(select), parse_split(score)
    if a == b and (half_a is None or half_b is None or half_a == half_b):
        raise SearchError(
            f"select_split {select!r} and score_split {score!r} overlap; allowed: disjoint splits, "
            f"e.g. {a}/a and {a}/b, or train and validation"
        )


def check_disjoint(select: list[Task], score: list[Task]) -> None:
    """Refuse selection and scoring splits that share an example of any task."""
    for a, b in zip(select, score):
        shared = {e.doc_id for e in a.examples} & {e.doc_id for e in b.examples}
        if shared:
            raise SearchError(
                f"select_split {a.split!r} and score_split {b.split!r} share {len(shared)} examples of {a.name}; "
                "allowed: splits with no example in common, e.g. validation/a and validation/b"
            )


def _context(ctx: StudyContext, tasks: list[Task], loaded, settings, split: str, n_samples: int) -> StudyContext:
    compiled = use_compile(settings.compile, loaded.device)
    evaluator = Evaluator(loaded, tasks, settings.batch_size, chunk_budget_gb=settings.chunk_budget_gb, compile=compiled)
    identity = study_identity(loaded, tasks, split, n_samples, settings.seed, settings.sample)
    return StudyContext(ctx.client, ctx.experiment_id, ctx.parent_id, evaluator, identity)


def _tasks(s: MethodSelectionSettings) -> tuple[list[Task], list[Task], list[Task]]:
    """The tasks selected on and scored on (disjoint), and the perplexity tasks among the first."""
    names_ = parse_task_list(s.tasks)
    select_tasks = [
        load_split(t, s.select_split, s.select_n_samples or s.n_samples, s.ppl_docs, s.seed, s.data_dir, s.sample) for t in names_
    ]
    score_tasks = [load_split(t, s.score_split, s.n_samples, s.ppl_docs, s.seed, s.data_dir, s.sample) for t in names_]
    check_disjoint(select_tasks, score_tasks)
    return select_tasks, score_tasks, [t for t in select_tasks if t.kind == "perplexity"]


def _report(loaded, methods, s, select_tasks, score_tasks, selection, per_unit, selected, outcomes) -> dict:
    """The method selection report: what each method selected, its share of parameters, its score runs, the criteria."""
    from pruning.families import removed_parameters

    total = sum(p.numel() for p in loaded.model.parameters())
    return {
        "model": loaded.name,
        "num_blocks": loaded.num_blocks,
        "methods": [m.name for m in methods],
        "k": list(range(1, s.max_k + 1)),
        "select_split": s.select_split,
        "score_split": s.score_split,
        "select_data": procedures.data_of(select_tasks),
        "score_data": procedures.data_of(score_tasks),
        "selected": {m: [[str(u) for u in c] for c in cs] for m, cs in selected.items()},
        "fraction_removed": {m: [removed_parameters(loaded, c) / total for c in cs] for m, cs in selected.items()},
        "score_runs": {m: [outcomes[c].run_id for c in cs] for m, cs in selected.items()},
        "baseline_run": outcomes[()].run_id,
        "criteria": per_unit,
        "cost": {
            name: {**spent, "unit": "forward passes of the unpruned model over data"} for name, spent in selection.cost.items()
        },
        "tasks": [{"name": t.name, "kind": t.kind, "headline": t.headline} for t in score_tasks],
    }


def main(argv=None) -> None:
    """Select with every method and score the selections: `python -m search.compare ...` or
    `mlflow run . -e select_methods`."""
    args = parser().parse_args(argv)
    s = cli.settings_from(MethodSelectionSettings, args)
    methods = parse_methods(s.methods)
    check_splits(s.select_split, s.score_split)
    if s.max_k < 1:
        raise SearchError(f"max_k must be at least 1, got {s.max_k}")
    select_tasks, score_tasks, ppl_tasks = _tasks(s)
    wanted = {m.criterion for m in methods if m.criterion}
    if not ppl_tasks and wanted & {"ppl_drop", "taylor"}:
        raise SearchError(
            f"criterion {sorted(wanted & {'ppl_drop', 'taylor'})[0]} needs calibration text: add a perplexity task "
            "(e.g. wikitext or pydoc_ppl) to tasks"
        )
    client = tracking.connect(args.tracking_uri or None)
    params = dataclasses.asdict(s)
    with tracking.study_run(client, names.METHOD_SELECTION, f"{names.COMPARE_METHODS}/{s.model}", params) as (run_id, exp_id):
        loaded = load_model(
            s.model, device=s.device, dtype=s.dtype, revision=s.revision or None, blocks_path=s.blocks_path or None
        )
        if s.max_k > loaded.num_blocks - 1:
            raise SearchError(f"max_k {s.max_k} is beyond the units of this model; allowed: 1..{loaded.num_blocks - 1}")
        root = StudyContext(client, exp_id, run_id, None, {})
        select_n = s.select_n_samples or s.n_samples
        select_ctx = _context(root, select_tasks, loaded, s, s.select_split, select_n)
        score_ctx = _context(root, score_tasks, loaded, s, s.score_split, s.n_samples)
        ppl_ctx = _context(root, ppl_tasks, loaded, s, s.select_split, select_n) if ppl_tasks else None
        selection = procedures.Selection(select_ctx, ppl_ctx, s)
        logger.info(f"selecting on {s.select_split}: {procedures.data_of(select_tasks)}")
        selection.prepare()
        cheap = ["drop", "block_influence", "angular_distance"] + (["ppl_drop", "taylor"] if ppl_tasks else [])
        per_unit = selection.per_unit(cheap)
        for values in per_unit.values():
            for metric, series in values.items():
                tracking.log_series(client, run_id, metric, [v if math.isfinite(v) else float("nan") for v in series])
        selected, started = {}, time.perf_counter()
        for i, method in enumerate(methods, 1):
            logger.info(f"method {i} of {len(methods)}: {method.name} (elapsed {time.perf_counter() - started:.0f} s)")
            selected[method.name] = procedures.select(selection, method, s.max_k)
        configs = sorted({c for cs in selected.values() for c in cs} | {()})
        logger.info(f"scoring {len(configs)} distinct configurations on {s.score_split}: {procedures.data_of(score_tasks)}")
        outcomes = Worker(score_ctx).run(configs)
        report = _report(loaded, methods, s, select_tasks, score_tasks, selection, per_unit, selected, outcomes)
        failed = [m for m, runs in report["score_runs"].items() if any(outcomes[c].error for c in selected[m])]
        if failed:
            raise RuntimeError(f"scoring the selections of {', '.join(failed)} failed; rerun to retry (the rest is reused)")
        tracking.log_json(client, run_id, names.METHOD_SELECTION_REPORT, report)
    for m, cs in selected.items():
        print(f"{m:28s} " + " | ".join(",".join(str(u.block) for u in c) for c in cs))
    print(f"selection run: {run_id}\nnext: python -m analysis.compare_methods --run_id {run_id}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
