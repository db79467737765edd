"""Opening a study: the model and tasks named by the common parameters (search.settings), the
evaluator that scores them, and the StudyContext the sensitivity and beam_search entry points share."""

from __future__ import annotations

from contract import names, tracking
from pruning.compile import use_compile
from pruning.evaluate import Evaluator
from pruning.families import branches_of
from pruning.models import load_model
from pruning.tasks import load_task, parse_task_list
from pruning.vlm import SCORER_VERSION as GENERATION_SCORER
from pruning.vlm import GenerationEvaluator
from search import progress
from search.configs import StudyContext, study_identity
from search.settings import SensitivitySettings


def open_context(settings: SensitivitySettings, client, parent_id: str, exp_id: str) -> StudyContext:
    """Load the model and tasks named by the common parameters and build the study context."""
    tasks = [
        load_task(name, settings.split, settings.n_samples or None, settings.seed, settings.data_dir or None, settings.sample)
        for name in parse_task_list(settings.tasks)
    ]
    with progress.phase(f"loading model {settings.model}"):
        loaded = load_model(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            revision=settings.revision or None,
            blocks_path=settings.blocks_path or None,
        )
    if settings.removal_unit != "block":
        branches_of(loaded.model)  # a family without an adapter fails here, before any configuration run
    identity = study_identity(loaded, tasks, settings.split, settings.n_samples, settings.seed, settings.sample)
    if any(t.kind == "generation" for t in tasks):  # VQA tasks: scored by generation
        evaluator = GenerationEvaluator(loaded, tasks, settings.batch_size)
        identity["generation_scorer"] = GENERATION_SCORER
    else:
        compiled = use_compile(settings.compile, loaded.device)
        evaluator = Evaluator(loaded, tasks, settings.batch_size, chunk_budget_gb=settings.chunk_budget_gb, compile=compiled)
    tracking.log(
        client,
        parent_id,
        params={"num_blocks": loaded.num_blocks, "model_revision": loaded.revision, "model_blocks_path": loaded.blocks_path},
        tags={names.task_type_tag(t.name): t.task_type for t in tasks if t.task_type},
    )
    return StudyContext(client, exp_id, parent_id, evaluator, identity)


def study_params(settings: SensitivitySettings) -> dict:
    """The parent run's params (the MLproject parameters)."""
    keys = ("model", "tasks", "split", "n_samples", "sample", "batch_size", "seed", "device", "dtype", "removal_unit")
    return {k: getattr(settings, k) for k in keys}
