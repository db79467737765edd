"""What the search entry points share: their user errors, run as one-line errors (their settings: search.settings)."""

from __future__ import annotations

from contract import cli, stores
from pruning.criteria import CriterionError
from pruning.models import ModelError
from pruning.tasks import TaskError
from pruning.units import UnitError


class SearchError(ValueError):
    """A search parameter, or the storage that workers share, cannot be used."""


USER_ERRORS = (ModelError, TaskError, stores.TrackingError, SearchError, CriterionError, UnitError)


def run_main(main, argv=None) -> int:
    """Run `main(argv)`; a user error (also a bad argument) becomes one line `error: ...` on stderr and exit
    code 2, Ctrl-C and SIGTERM mark the runs in flight KILLED, and under `mlflow run` the run it created
    ends with `prunetrack.error` (contract.cli.run_main)."""
    return cli.run_main(main, argv, USER_ERRORS)
