"""What `search.export_model` exports: a beam search run's recommendation, a prune run's width-pruned
model, or `model` with a `blocks` or `units` list; checked, no run created."""

from __future__ import annotations

from dataclasses import dataclass

from contract import names, tracking
from contract.records import BeamResults
from pruning.tasks import parse_task_list
from pruning.units import Config, UnitError, normalize, parse_blocks, parse_units
from search.cli import SearchError


@dataclass
class Source:
    """What to export: the dense model, the blocks and other units to remove, the tasks to re-score and where they come from."""

    model: str
    revision: str | None
    blocks_path: str | None
    tasks: list[str]
    split: str
    n_samples: int
    seed: int
    removed: tuple[int, ...] = ()
    units: Config = ()  # sublayers (or blocks) to remove besides `removed`
    kind: str = "blocks"  # beam_search, prune or blocks
    run_id: str = ""
    reference_run_id: str = ""  # the run whose metrics the re-scored exported model should match
    sample: str = "seeded"  # how the n_samples examples were taken: seeded or first


def source_of(client, args) -> Source:
    """The source named by `run_id` (a beam search or prune run) or by `model` and `blocks` and/or `units`; checked,
    no run created."""
    if args.run_id and (args.blocks or args.units):
        raise SearchError("pass run_id=<beam search or prune run> or blocks=<list>/units=<list>, not both")
    return _run_source(client, args) if args.run_id else _listed_source(args)


def _listed_source(args) -> Source:
    """The source named by `model` and `blocks` and/or `units`."""
    if not (args.blocks or args.units):
        raise SearchError(
            "nothing to export: pass run_id=<beam search or prune run>, blocks=<list, e.g. 3,5> or units=<list, e.g. a4,m13,b20>"
        )
    try:
        units = normalize(parse_units(args.units))
    except UnitError as err:
        raise SearchError(str(err)) from None
    return Source(
        args.model,
        args.revision or None,
        args.blocks_path or None,
        parse_task_list(args.tasks),
        args.split,
        args.n_samples,
        args.seed,
        parse_blocks(args.blocks),
        units,
        sample=args.sample,
    )


def _run_source(client, args) -> Source:
    """The source named by `run_id`: a beam search run's recommendation for `num_removed`, or a prune run."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(args.run_id)
    except MlflowException:
        raise SearchError(f"run {args.run_id!r} not found in tracking store {client.tracking_uri!r}") from None
    kind, p = run.data.tags.get(names.KIND, ""), run.data.params
    revision = p.get("model_revision") if p.get("model_revision") not in (None, "", "local") else None
    common = dict(
        model=p.get("model", ""),
        revision=revision,
        blocks_path=p.get("model_blocks_path") or None,
        split=p.get("split", "validation"),
        n_samples=int(p.get("n_samples", 0)),
        seed=int(p.get("seed", 0)),
        kind=kind,
        run_id=args.run_id,
        sample=p.get("sample", "seeded"),
    )
    if kind == names.BEAM_SEARCH:
        try:
            results = BeamResults.from_json(tracking.load_json(client, args.run_id, names.BEAM_RESULTS))
        except Exception:
            raise SearchError(f"beam search run {args.run_id} has no readable {names.BEAM_RESULTS} (did it finish?)") from None
        found = {e.num_removed: e for e in results.recommendations}
        k = args.num_removed or max(found, default=0)
        if k not in found:
            allowed = f"1..{max(found)}" if found else "none, it recorded no recommendation"
            raise SearchError(f"num_removed {k} was not searched by beam search run {args.run_id}; allowed: {allowed}")
        return Source(**common, tasks=results.tasks, units=found[k].units, reference_run_id=found[k].run_id)
    if kind == names.PRUNE:
        tasks = parse_task_list(p["tasks"])
        tasks += [p["ppl_task"]] if p.get("ppl_task") and p["ppl_task"] not in tasks else []
        return Source(**common, tasks=tasks, reference_run_id=args.run_id)
    raise SearchError(f"run {args.run_id} is a {kind or 'untagged'} run; allowed: a beam_search or prune run")
