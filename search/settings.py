"""The settings of the search entry points (sensitivity, beam_search, prune, export_model, select_methods,
taylor_study), each declared once as a dataclass (contract.cli) whose fields are the MLproject parameters
(tests/test_settings.py checks it).

Light to import: an entry point answers `--help` and rejects a bad argument before it loads torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from contract import cli
from contract.cli import setting
from pruning.compile import COMPILE_CHOICES
from pruning.drop import RACING_ALPHA
from pruning.tasks import SAMPLES, TaskError, parse_task_list

REMOVAL_UNITS = ("block", "sublayer", "both")  # pruning.units.all_units


@dataclass
class ModelDataSettings:
    """The model and the data it is scored on, whichever split."""

    model: str = setting("default", "hub id, local model directory, .gguf file, or 'default'")
    revision: str = setting("", "hub revision (branch, tag or commit)")
    tasks: str = setting("pydoc_ppl,pydoc_cloze", "comma-separated task names or suites (zero_shot_7: the seven zero-shot tasks)")
    n_samples: int = setting(100, "examples per task (0 = all)")
    sample: str = setting(
        "seeded",
        "how the n_samples examples are taken: seeded (a sample drawn with seed) or first "
        "(the first in file order, like other tools' --limit)",
        SAMPLES,
    )
    batch_size: int = setting(8, "requests per forward pass")
    seed: int = setting(0, "sampling seed")
    device: str = setting("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    dtype: str = setting("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    compile: str = setting(
        "auto", "compile the repeated block for scoring (and use flex_attention): auto (on CUDA), true, false", COMPILE_CHOICES
    )
    blocks_path: str = setting("", "dotted path of the block list, for model families not known")
    data_dir: str = setting("", "folder with <task>/<split>.jsonl copies (offline; also $PRUNETRACK_DATA_DIR)")


@dataclass
class EvalSettings(ModelDataSettings):
    """The model and the data it is scored on: one split."""

    split: str = setting("validation", "train or validation")
    system_metrics: bool = setting(False, "log CPU and memory (and GPU, always on CUDA) as MLflow system metrics")


@dataclass
class SensitivitySettings(EvalSettings):
    """The `sensitivity` entry point's settings, shared by `beam_search`."""

    chunk_budget_gb: float = setting(4.0, "memory for the block outputs kept for one data chunk (sets the chunk size)")
    removal_unit: str = setting(
        "block",
        "what a configuration removes: block (whole blocks), sublayer (attention and MLP sublayers; sensitivity "
        "scores each block and both its sublayers), both (beam_search: blocks and sublayers together)",
        REMOVAL_UNITS,
    )


@dataclass
class BeamSearchSettings(SensitivitySettings):
    """The `beam_search` entry point's settings."""

    beam_width: int = setting(3, "configurations kept per step")
    max_removed: int = setting(4, "most blocks removed")
    min_active_blocks: int = setting(1, "never keep fewer blocks than this")
    protect: str = setting("", "blocks never removed, e.g. 0,29 or 0-3,29")
    criterion: str = setting(
        "all",
        "the drop criterion ranked by mean (mean drop over the tasks), a task name, or all (mean beam plus one beam per "
        "task); or another criterion: drop (= mean), ppl_drop, block_influence, angular_distance, taylor",
    )
    procedure: str = setting("beam", "how units are chosen: beam, greedy (beam_width 1), one_shot, last_n")
    retries: int = setting(3, "retries of a failing evaluation")
    retry_delay: float = setting(60.0, "seconds between retries")
    storage: str = setting(
        "", "database shared by workers: postgresql://..., sqlite:///path, a file path or a profile name; empty: one process"
    )
    racing: bool = setting(True, "stop candidates confidently out of every beam early (false: exhaustive)")
    racing_alpha: float = setting(RACING_ALPHA, "error level of racing's stops, per step")
    claim_size: int = setting(32, "configurations a worker claims and scores together when workers share storage")
    max_params_removed_frac: float = setting(
        0.0,
        "never remove more than this fraction of the blocks' parameters (0: no limit); e.g. 0.1334 with "
        "removal_unit=sublayer matches removing 4 of 30 equal blocks",
    )

    @property
    def ranked_criterion(self) -> str:
        """The criterion as the search ranks by it: `drop` is the mean drop, `mean`."""
        return "mean" if self.criterion == "drop" else self.criterion

    def check(self) -> None:
        """Validate the search's settings before any compute (one-line errors)."""
        from pruning.criteria import CRITERIA
        from search.cli import SearchError
        from search.procedures import check

        tasks = parse_task_list(self.tasks)
        for name in ("beam_width", "max_removed", "min_active_blocks"):
            if getattr(self, name) < 1:
                raise SearchError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.retries < 0 or self.retry_delay < 0:
            raise SearchError(f"retries and retry_delay must be >= 0, got {self.retries} and {self.retry_delay}")
        criterion = self.ranked_criterion
        if criterion not in ("mean", "all", *tasks, *CRITERIA):
            allowed = ", ".join(["mean", "all", *tasks, *CRITERIA])
            raise SearchError(f"unknown criterion {self.criterion!r}; allowed: {allowed}")
        check("drop" if criterion in ("mean", "all", *tasks) else criterion, self.procedure)
        if self.removal_unit != "block" and (self.procedure not in ("beam", "greedy") or criterion in CRITERIA):
            raise SearchError(
                f"criterion {self.criterion} with procedure {self.procedure} chooses whole blocks; allowed: removal_unit "
                "block, or criterion mean, all or a task with procedure beam or greedy"
            )
        if not 0 < self.racing_alpha < 1:
            raise SearchError(f"racing_alpha must be between 0 and 1 (exclusive), got {self.racing_alpha}")
        if self.claim_size < 1:
            raise SearchError(f"claim_size must be at least 1, got {self.claim_size}")
        if not 0 <= self.max_params_removed_frac < 1:
            raise SearchError(f"max_params_removed_frac must be in [0, 1), got {self.max_params_removed_frac}")


DEFAULT_METHODS = (
    "drop:beam,drop:greedy,drop:one_shot,ppl_drop:greedy,ppl_drop:one_shot,"
    "block_influence:one_shot,angular_distance:one_shot,taylor:one_shot,last_n"
)


def _as_eval(name: str, default=None):
    """EvalSettings' setting `name` (its help and allowed values), with another default when given."""
    f = next(f for f in fields(EvalSettings) if f.name == name)
    return setting(f.default if default is None else default, f.metadata["help"], f.metadata["choices"])


@dataclass
class PruneSettings:
    """Everything that defines one pruning run (the `prune` entry point's settings)."""

    model: str = _as_eval("model")
    revision: str = _as_eval("revision")
    pruning_ratio: float = setting(0.2, "fraction of the prunable (attention + MLP) parameters to remove, 0 < r < 1")
    taylor_seq_len: int = setting(64, "tokens per calibration sequence (at most the model's context)")
    taylor_num_samples: int = setting(128, "calibration sequences")
    taylor_batch_size: int = setting(8, "sequences per backward pass")
    taylor_order: str = setting("first", "first or second")
    calibration: str = setting("pydoc", "pydoc (Python's docs), a .txt or .jsonl file, or hf:<dataset>[:<config>] (train split)")
    normalization: str = setting("none", "per-layer score normalisation: none, max, sum, mean, standardize")
    protect_first_last: bool = setting(False, "never prune the first and last blocks")
    max_layer_rate: float = setting(1.0, "cap on any block's pruning rate")
    extreme_threshold: float = setting(0.8, "a block pruned beyond this counts in extreme_pruning_layers")
    tasks: str = setting("pydoc_cloze", "evaluation tasks (zero_shot_7: the seven zero-shot tasks)")
    ppl_task: str = setting("pydoc_ppl", "the task whose perplexity is ppl (wikitext: WikiText-2; empty: none)")
    split: str = _as_eval("split")
    n_samples: int = _as_eval("n_samples")
    sample: str = _as_eval("sample")
    batch_size: int = _as_eval("batch_size")
    seed: int = _as_eval("seed")
    device: str = _as_eval("device")
    dtype: str = _as_eval("dtype")
    compile: str = _as_eval("compile")
    data_dir: str = _as_eval("data_dir")
    baseline: bool = setting(
        True, "also evaluate the unpruned model (a configuration run found by hash: once per model and data)"
    )
    save_model: bool = setting(True, "log the pruned model as artifact pruned_model/")

    def check(self) -> None:
        """Validate what can be validated without a model (one-line errors)."""
        from pruning import taylor
        from pruning.models import ModelError

        taylor.check_prune_options(self.pruning_ratio, self.normalization, self.max_layer_rate)
        if self.sample not in SAMPLES:
            raise TaskError(f"unknown sample {self.sample!r}; allowed: {', '.join(SAMPLES)}")
        if self.compile not in COMPILE_CHOICES:
            raise ModelError(f"unknown compile {self.compile!r}; allowed: {', '.join(COMPILE_CHOICES)}")
        if self.taylor_order not in ("first", "second"):
            raise ModelError(f"unknown taylor_order {self.taylor_order!r}; allowed: first, second")
        if not 0 < self.extreme_threshold <= 1:
            raise ModelError(f"extreme_threshold {self.extreme_threshold} out of range; allowed: 0 < t <= 1")
        for name in ("taylor_num_samples", "taylor_batch_size", "taylor_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ModelError(f"{name} {getattr(self, name)} out of range; allowed: >= 1")


@dataclass
class SpeedSettings:
    """How export_model times dense and pruned models: `speed_batch` random prompts of `prompt_len` tokens,
    then `new_tokens` greedy decode steps with the KV cache; one warm-up, then at least `repeats` rounds, more
    until the speedups' intervals are tight (search.speedup), at most `max_repeats`."""

    speed_batch: int = setting(1, "prompts timed together")
    prompt_len: int = setting(128, "tokens per timed prompt")
    new_tokens: int = setting(32, "greedy decode steps timed (with the KV cache)")
    repeats: int = setting(5, "timed rounds at least, after one warm-up")
    max_repeats: int = setting(
        30, "timed rounds at most: rounds go on until the speedups' 95 percent intervals are within 5 percent"
    )

    def speed_settings(self) -> dict:
        """These settings alone, by name (the export run's params; what a timing subprocess is sent)."""
        return {f.name: getattr(self, f.name) for f in fields(SpeedSettings)}

    def check(self) -> None:
        """Validate the timing settings (one-line errors)."""
        from search.cli import SearchError

        for name, value in self.speed_settings().items():
            if value < 1:
                raise SearchError(f"{name} {value} out of range; allowed: >= 1")
        if self.max_repeats < self.repeats:
            raise SearchError(f"max_repeats {self.max_repeats} is below repeats {self.repeats}; allowed: >= repeats")


@dataclass
class ExportModelSettings(SpeedSettings, EvalSettings):
    """The `export_model` entry point's settings: what to export, where, and how to time it (SpeedSettings)."""

    run_id: str = setting("", "a beam_search or prune run to export")
    num_removed: int = setting(0, "which recommendation of a beam search (0: the largest)")
    blocks: str = setting("", "blocks to remove from model instead of a run, e.g. 3,5,7")
    units: str = setting("", "units to remove from model instead of a run, e.g. a4,a13,b20 (attention, mlp, block)")
    register_as: str = setting("", "register the model under this name (a new version)")
    output_dir: str = setting("", "also write the plain Hugging Face model directory here")


@dataclass
class MethodSelectionSettings(ModelDataSettings):
    """The `select_methods` entry point's settings: which criterion/procedure pairs select configurations
    of k = 1..max_k blocks on one split, and the split their selections are scored on."""

    select_n_samples: int = setting(
        0, "examples per task on the selection split (0 = n_samples); n_samples is the scoring split's"
    )
    ppl_docs: int = setting(2, "documents of each perplexity task per split (0 = all; a WikiText-2 page is ~6,000 tokens)")
    chunk_budget_gb: float = setting(4.0, "memory for the block outputs kept for one data chunk (sets the chunk size)")
    methods: str = setting(DEFAULT_METHODS, "comma-separated criterion:procedure pairs, and last_n (the baseline)")
    max_k: int = setting(6, "select configurations of 1..max_k blocks")
    select_split: str = setting(
        "validation/a", "where methods select: train, validation, or a seeded half of one (validation/a, validation/b)"
    )
    score_split: str = setting("validation/b", "where selections are scored; no example may be shared with select_split")
    beam_width: int = setting(3, "configurations kept per step by the beam procedure")
    racing: bool = setting(True, "greedy and beam stop candidates confidently out of every beam early")
    racing_alpha: float = setting(RACING_ALPHA, "error level of racing's stops, per step")


def sensitivity_parser() -> argparse.ArgumentParser:
    """The `sensitivity` entry point's command line."""
    return cli.parser_for(SensitivitySettings, cli.TrackingSettings, description="Block sensitivity study")


def beam_parser() -> argparse.ArgumentParser:
    """The `beam_search` entry point's command line."""
    return cli.parser_for(BeamSearchSettings, cli.TrackingSettings, description="Beam search over removed blocks")


def prune_parser() -> argparse.ArgumentParser:
    """The `prune` entry point's command line."""
    return cli.parser_for(
        PruneSettings, cli.TrackingSettings, description="Taylor-importance global width pruning, tracked in MLflow"
    )


def method_selection_parser() -> argparse.ArgumentParser:
    """The `select_methods` entry point's command line."""
    return cli.parser_for(
        MethodSelectionSettings,
        cli.TrackingSettings,
        description="Select configurations with each pruning method on one split and score them on another",
    )


def export_model_parser() -> argparse.ArgumentParser:
    """The `export_model` entry point's command line."""
    return cli.parser_for(
        ExportModelSettings,
        cli.TrackingSettings,
        description="Export a pruned model as a plain Hugging Face model and an MLflow model, with its measured speedup",
    )


@dataclass
class StudySettings:
    """The `taylor_study` entry point's settings (the MLproject parameters) plus the tracking URI."""

    config: str = setting("quick", "study config: a name in mlruns_config/studies or a .yaml path")
    storage: str = setting(
        "",
        "Optuna storage: a database URL, file path or profile name (mlruns_config/profiles), "
        "else the config's, else sqlite:///optuna.db; for a password use a profile, PGPASSWORD "
        "or ~/.pgpass",
    )
    study_name: str = setting("", "the study's name, else the config's, else the config file's name")
    n_trials: int | None = setting(
        None, "trials the study holds, however many workers share it, else the config's (a grid: its size)"
    )
    report_only: bool = setting(False, "true: only (re)build search_results.csv and the plots of an existing study")
    system_metrics: bool = setting(False, "log CPU and memory (and GPU, always on CUDA) as MLflow system metrics")
    tracking_uri: str = setting("", "tracking URI or profile; overrides $PRUNETRACK_PROFILE, then $MLFLOW_TRACKING_URI")


def study_parser() -> argparse.ArgumentParser:
    """The `taylor_study` entry point's arguments, one per StudySettings field."""
    return cli.parser_for(StudySettings, description="Optuna study of Taylor pruning parameters, every trial an MLflow run")
