"""What every entry point shares: the common parameters, opening a study, one-line errors."""

from __future__ import annotations

import argparse

from pruning.models import ModelError
from pruning.tasks import SAMPLES, TaskError
from search import tracking


class SearchError(ValueError):
    """A search parameter, or the storage that workers share, cannot be used."""


USER_ERRORS = (ModelError, TaskError, tracking.TrackingError, SearchError)


def common_parser(description: str) -> argparse.ArgumentParser:
    """Parameters shared by the block-removal entry points (the MLproject names)."""
    parser = tracking.ArgumentParser(description=description)
    parser.add_argument("--model", default="default", help="hub id, local directory, .gguf file, or 'default'")
    parser.add_argument("--revision", default="", help="hub revision (branch, tag or commit)")
    parser.add_argument("--tasks", default="pydoc_ppl,pydoc_cloze", help="comma-separated task names or suites")
    parser.add_argument("--split", default="validation", help="train or validation")
    parser.add_argument("--n_samples", type=int, default=100, help="examples per task (0 = all)")
    parser.add_argument("--sample", default="seeded", choices=SAMPLES,
                        help="how n_samples examples are taken: seeded (a seeded sample) or first (the first in file "
                        "order, like other tools' --limit)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--blocks_path", default="", help="dotted path of the block list, for unknown families")
    parser.add_argument("--data_dir", default="", help="folder with <task>/<split>.jsonl copies (offline)")
    parser.add_argument("--tracking_uri", default="", help="tracking URI or profile (mlruns_config/profiles/<name>.yaml or a "
                        ".yaml path); overrides $PRUNETRACK_PROFILE, then $MLFLOW_TRACKING_URI")
    parser.add_argument("--chunk_budget_gb", type=float, default=4.0,
                        help="memory for the block outputs kept for one data chunk (sets the chunk size)")
    return parser


def run_main(main, argv=None) -> int:
    """Run `main(argv)`; a user error (also a bad argument) becomes one line `error: ...` on stderr and exit
    code 2, Ctrl-C and SIGTERM mark the runs in flight KILLED, and under `mlflow run` the run it created
    ends with `prunetrack.error` (search.tracking.guarded)."""
    return tracking.guarded(main, argv, USER_ERRORS)
