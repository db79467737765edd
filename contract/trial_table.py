"""The trial runs of a Taylor study read back from the tracking store as one table.

A trial run is a `prunetrack.kind=prune` run tagged with its study and trial number (contract.names).
`search.study_report` builds the study's `search_results.csv` from this table, `analysis.correlation`
its correlations; both read the runs through MLflow only.
"""

from __future__ import annotations

import pandas as pd

from contract import names

FIRST_COLUMNS = ("trial_number", "run_id", "status", "error")


def param_value(text: str):
    """A param as a number where it is one (an int where it is whole, booleans as 0/1), else the text."""
    if text.lower() in ("true", "false"):
        return int(text.lower() == "true")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def trial_table(runs: list) -> tuple[pd.DataFrame, set[str]]:
    """One row per trial run, by trial number: trial number, run id, status, `prunetrack.error` ('' when none),
    params (numbers where they are) and final metric values (per-layer series `layer_*` left out); and the
    names of the param columns."""
    rows, params = [], set()
    for run in runs:
        number = run.data.tags.get(names.TRIAL_NUMBER)
        row = {
            "trial_number": int(number) if number is not None else None,
            "run_id": run.info.run_id,
            "status": run.info.status,
            "error": run.data.tags.get(names.ERROR, ""),
        }
        row.update({k: param_value(v) for k, v in run.data.params.items()})
        params |= set(run.data.params)
        row.update({k: v for k, v in run.data.metrics.items() if not k.startswith("layer_")})
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=FIRST_COLUMNS), params
    table = pd.DataFrame(rows).sort_values(["trial_number", "run_id"], na_position="last").reset_index(drop=True)
    return table, params
