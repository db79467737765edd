"""The settings of the analysis entry points (consistency, correlation, beam_summary, export, compare_methods), each declared once
as a dataclass (contract.cli) whose fields are the MLproject parameters (tests/test_settings.py checks it).

Light to import: an entry point answers `--help` and rejects a bad argument before it loads MLflow or SciPy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from contract import cli
from contract.cli import REQUIRED, setting


@dataclass
class OutputSettings:
    """Where else an analysis writes its outputs (they are always the artifacts of its run)."""

    output_dir: str = setting("", "also write the outputs to this folder")


@dataclass
class BootstrapSettings:
    """How an analysis resamples for its intervals."""

    n_resamples: int = setting(1000, "bootstrap resamples")
    ci_level: float = setting(0.95, "confidence interval level")
    seed: int = setting(0, "bootstrap seed")


def check_bootstrap(n_resamples: int, ci_level: float) -> None:
    """Reject resampling settings out of range (one-line errors)."""
    from analysis.store import AnalysisError

    if n_resamples < 1:
        raise AnalysisError(f"n_resamples {n_resamples} out of range; allowed: >= 1")
    if not 0 < ci_level < 1:
        raise AnalysisError(f"ci_level {ci_level} out of range; allowed: 0 < ci_level < 1")


@dataclass
class ConsistencySettings(BootstrapSettings):
    """The `consistency` entry point's settings."""

    model: str = setting("", "the model's name as the sensitivity studies logged it")
    experiment: str = setting("", "only studies in this experiment (name or id)")
    threshold: float = setting(0.9, "consistent when Spearman r >= threshold")


@dataclass
class CorrelationSettings:
    """The `correlation` entry point's settings."""

    study_name: str = setting("", "Optuna study name (tag optuna.study_name)")
    experiment: str = setting("", "experiment holding the trial runs (name or id)")
    target: str = setting("acc_mean", "acc_mean, acc_<task>, acc_norm_<task> or ppl")
    max_predictors: int = setting(2, "most predictors in the linear model")


@dataclass
class BeamSummarySettings:
    """The `beam_summary` entry point's settings."""

    run_id: str = setting("", "the beam search run; empty: the latest FINISHED one")
    experiment: str = setting("", "look for beam searches in this experiment only")
    model: str = setting("", "only beam searches of this model")
    task_types: str = setting("", "task=type,... to group the drops by task type")


@dataclass
class CompareMethodsSettings(BootstrapSettings):
    """The `compare_methods` entry point's settings."""

    run_id: str = setting("", "the method_selection run (search.compare); empty: the latest FINISHED one")
    experiment: str = setting("", "look for method selections in this experiment only")


@dataclass
class ExportSettings:
    """The `export` entry point's settings."""

    dest: str = setting(REQUIRED, "s3://bucket/prefix")
    run_ids: str = setting("", "comma-separated run ids; empty: every FINISHED run of kinds")
    experiment: str = setting("", "only runs in this experiment (name or id)")
    kinds: str = setting(
        "consistency,correlation,beam_summary,beam_search,study", "prunetrack.kind values to export when no run ids are given"
    )
    endpoint_url: str = setting("", "S3-compatible endpoint; empty: $AWS_ENDPOINT_URL, else $MLFLOW_S3_ENDPOINT_URL")


def _parser(settings, description: str) -> argparse.ArgumentParser:
    return cli.parser_for(settings, OutputSettings, cli.TrackingSettings, description=description)


def consistency_parser() -> argparse.ArgumentParser:
    """The `consistency` entry point's command line."""
    return _parser(ConsistencySettings, "Train vs validation consistency of block importance")


def correlation_parser() -> argparse.ArgumentParser:
    """The `correlation` entry point's command line."""
    return _parser(CorrelationSettings, "Correlation of pruning parameters and gradient statistics with accuracy")


def beam_summary_parser() -> argparse.ArgumentParser:
    """The `beam_summary` entry point's command line."""
    return _parser(BeamSummarySettings, "Cross-dataset recommendation table of a beam search")


def compare_methods_parser() -> argparse.ArgumentParser:
    """The `compare_methods` entry point's command line."""
    return _parser(
        CompareMethodsSettings, "Held-out comparison of pruning methods (criterion x procedure) from a method selection"
    )


def export_parser() -> argparse.ArgumentParser:
    """The `export` entry point's command line."""
    return _parser(ExportSettings, "Upload the reports and figures of chosen runs to S3")
