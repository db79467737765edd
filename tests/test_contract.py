"""The tracking contract has one home (contract/) and docs/contract.md documents exactly it.

The check reads the page's prose (the Markdown as written): the tables docs/hooks.py generates from
contract/names.py at build time list every name by construction, so only the prose can miss one.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from contract import names, records

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "contract.md").read_text()
CODE = set(re.findall(r"`([^`\n]+)`", PAGE))  # every name the page's prose shows as code
DOCUMENTED = CODE | {c.split("=")[0] for c in CODE}  # `prunetrack.stopped=racing` documents the tag too


def constants() -> dict[str, str]:
    """Every string constant of contract.names."""
    return {k: v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}


def test_every_name_of_the_contract_is_explained_in_the_docs():
    kinds = {
        names.SENSITIVITY,
        names.CONFIG,
        names.BEAM_SEARCH,
        names.PRUNE,
        names.STUDY,
        names.STUDY_WORKER,
        names.EXPORT,
        names.CONSISTENCY,
        names.CORRELATION,
        names.BEAM_SUMMARY,
        names.METHOD_SELECTION,
        names.COMPARE_METHODS,
    }
    missing = [f"{names.KIND}={k}" for k in sorted(kinds) if f"{names.KIND}={k}" not in DOCUMENTED]
    missing += [v for k, v in constants().items() if v not in kinds and v not in DOCUMENTED]
    patterns = [
        names.headline_tag("<task>"),
        names.recommended_tag("<k>"),
        names.task_type_tag("<task>"),
        names.metric("acc", "<task>"),
        names.beam_step("{k}"),
        names.per_example("<task>"),
    ]
    missing += [p for p in patterns if p not in DOCUMENTED]
    assert missing == []


def test_every_documented_prunetrack_tag_and_kind_is_in_the_contract():
    values = set(constants().values())
    tags = {d for d in CODE if d.startswith(("prunetrack.", "optuna."))}
    unknown = [t for t in sorted(tags) if t.split("=")[0] not in values]
    unknown += [t for t in sorted(tags) if "=" in t and t.split("=")[1] not in values | {"<analysis>", "racing"}]
    assert unknown == []


@pytest.mark.parametrize(
    "record", [records.SensitivityReport, records.Candidate, records.Recommendation, records.BeamStep, records.BeamResults]
)
def test_every_key_a_record_writes_is_documented(record):
    assert [f.name for f in dataclasses.fields(record) if f.name not in DOCUMENTED] == []


def test_records_round_trip_through_json_and_reject_what_they_are_not():
    stopped = records.Candidate(
        [3],
        "h3",
        "r3",
        "STOPPED",
        {"piqa": {"acc": 0.5}},
        partial_drops={"piqa": 0.2},
        n_examples={"piqa": 32},
        stopped="worse than 3 others",
    )
    done = records.Candidate([4], "h4", "r4", "FINISHED", {"piqa": {"acc": 0.7}}, {"piqa": 0.01}, 0.01)
    assert set(done.to_json()) == {"removed_blocks", "config_hash", "run_id", "status", "metrics", "drops", "mean_drop", "error"}
    step = records.BeamStep(1, [stopped, done], {"mean": [{"removed_blocks": [4], "score": 0.01}]}, [], [[3]])
    assert records.BeamStep.from_json(step.to_json()) == step and not stopped.ranked and done.ranked
    best = records.Recommendation(
        1, [4], 0.01, 0.0, 1, 0.01, 29, list(range(4)) + list(range(5, 30)), {"piqa": 0.01}, "h4", "r4", True
    )
    results = records.BeamResults(
        "m",
        ["piqa"],
        30,
        {"criterion": "mean"},
        {"piqa": {"acc": 0.71}},
        "r0",
        [best],
        {"29": best.active_blocks},
        {"piqa": [best]},
        [dataclasses.replace(stopped, step=1)],
    )
    again = records.BeamResults.from_json(results.to_json())
    assert again == results and again.recommendations[0].removed_blocks == [4] and again.failed[0].step == 1
    with pytest.raises(records.RecordError, match="missing .*recommendations"):
        records.BeamResults.from_json(
            {
                "model": "m",
                "tasks": [],
                "num_blocks": 1,
                "settings": {},
                "baseline": {},
                "baseline_run_id": None,
                "num_active_blocks": {},
            }
        )


@pytest.mark.parametrize(
    ("modules", "banned"),
    [
        (
            "contract.names, contract.records, contract.tracking, contract.stores, contract.naming, contract.launcher, "
            "contract.cli, contract.trial_table, contract.profiles",
            ("torch", "transformers", "pruning", "search", "analysis", "optuna"),
        ),
        (
            "analysis.consistency, analysis.correlation, analysis.beam_summary, analysis.export",
            ("torch", "transformers", "pruning", "search"),
        ),
    ],
)
def test_the_contract_depends_only_on_mlflow_and_analysis_only_on_it(modules, banned):
    # pruning's torch-free parts: the unit type the records share, and the definition of a drop (analysis)
    allowed = ("pruning", "pruning.units", "pruning.drop")
    code = (
        f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] in {banned!r} and m not in {allowed!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_logging_stays_within_mlflows_limits_per_call(sqlite_store):
    from contract import tracking

    _, client = sqlite_store
    run_id = client.create_run(tracking.experiment_id(client, "limits")).info.run_id
    calls = []
    log_batch = client.log_batch
    client.log_batch = lambda run, metrics=(), params=(), tags=(): (
        calls.append((len(metrics), len(params) + len(tags))) or log_batch(run, metrics=metrics, params=params, tags=tags)
    )
    tracking.log(
        client,
        run_id,
        params={f"p{i}": i for i in range(150)},
        tags={f"t{i}": i for i in range(80)},
        metrics={f"m{i}": i for i in range(2500)},
    )
    tracking.log_series(client, run_id, "series", range(1001))
    assert calls == [(1000, 100), (1000, 100), (500, 30), (1000, 0), (1, 0)]
    data = client.get_run(run_id).data
    assert (len(data.params), len(data.tags) >= 80, len(data.metrics)) == (150, True, 2501)
    assert len(client.get_metric_history(run_id, "series")) == 1001
