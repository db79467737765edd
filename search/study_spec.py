"""A Taylor study's config: the YAML file, its checks, and the study it describes (`StudySpec`).

A config (`mlruns_config/studies/<name>.yaml`) holds fixed pruning options (any PruneSettings
field), the search space (a list of values per parameter: a grid; a range {low, high[, step][, log]}:
TPE), the objective metric(s) with their directions, `n_trials`, the Optuna storage and worker
options. Every value is checked against what a prune run accepts before anything is recorded.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna

from contract import names, profiles
from pruning import taylor
from pruning.models import ModelError
from pruning.tasks import METRICS, parse_task_list
from search.cli import SearchError
from search.prune import PruneSettings

STUDIES_DIR = Path(__file__).resolve().parents[1] / "mlruns_config" / "studies"
DEFAULT_STORAGE = "sqlite:///optuna.db"
STUDY_KEYS = (
    "study_name",
    "storage",
    "sampler",
    "sampler_seed",
    "search_space",
    "objective",
    "direction",
    "n_trials",
    "max_retry",
)
GRAD_COLUMNS = tuple(taylor.gradient_summary([taylor.GradStats(1.0, 1.0, 1.0, 1.0)]))  # names prune runs log
RUN_METRICS = (
    "taylor_seconds",
    "eval_seconds",
    "pruned_fraction",
    "n_params_before",
    "n_params_after",
    "pruning_rate",
    "extreme_pruning_layers",
)


@dataclass
class StudySpec:
    """A study config: fixed prune settings, search space, objective(s), storage and worker options."""

    name: str
    storage: str
    settings: PruneSettings
    space: dict  # parameter -> list of values (grid points / categorical) or {low, high[, step][, log]}
    sampler: str  # grid or tpe
    objectives: list[str]
    directions: list[str]
    n_trials: int
    max_retry: int = 3
    sampler_seed: int | None = None

    def identity(self) -> dict:
        """What every worker of one study must agree on (JSON types)."""
        return json.loads(
            json.dumps(
                {
                    "settings": asdict(self.settings),
                    "space": self.space,
                    "sampler": self.sampler,
                    "objectives": self.objectives,
                    "directions": self.directions,
                }
            )
        )

    def grid(self) -> list[dict]:
        """Every grid point, in config order (the last parameter varies fastest)."""
        return [dict(zip(self.space, values)) for values in itertools.product(*self.space.values())]

    def suggest(self, trial: optuna.Trial) -> dict:
        """This trial's parameters: the enqueued grid point, or TPE's suggestion."""
        params = {}
        for name, domain in self.space.items():
            if isinstance(domain, list):
                params[name] = trial.suggest_categorical(name, domain)
            elif _field_type(name) is int:
                params[name] = trial.suggest_int(
                    name, domain["low"], domain["high"], step=domain.get("step", 1), log=domain.get("log", False)
                )
            else:
                params[name] = trial.suggest_float(
                    name, domain["low"], domain["high"], step=domain.get("step"), log=domain.get("log", False)
                )
        return params

    def sampler_object(self) -> optuna.samplers.BaseSampler:
        """The Optuna sampler: a grid over the space, or TPE."""
        if self.sampler == "grid":
            return optuna.samplers.GridSampler(self.space, seed=self.sampler_seed)
        return optuna.samplers.TPESampler(seed=self.sampler_seed)


def _field_type(name: str) -> type:
    return type(getattr(PruneSettings(), name))


def config_path(ref: str) -> Path:
    """A config named in mlruns_config/studies (`quick`) or a path to a .yaml file."""
    path = Path(ref) if ref.endswith((".yaml", ".yml")) else STUDIES_DIR / f"{ref}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in STUDIES_DIR.glob("*.yaml")))
        raise SearchError(f"study config {ref!r} not found; available: {names}, or a path to a .yaml file")
    return path


def load_spec(ref: str, storage: str = "", study_name: str = "", n_trials: int | None = None) -> StudySpec:
    """Read and check a study config; `storage`, `study_name` and `n_trials` override its values."""
    path = config_path(ref)
    where = f"config {path.name}"
    data = profiles.read_mapping(path, where, SearchError)
    prune_keys = asdict(PruneSettings())
    for key in data:
        if key not in prune_keys and key not in STUDY_KEYS:
            raise SearchError(
                f"{where}: unknown key {key!r}; allowed: {', '.join(STUDY_KEYS)}, or a prune option ({', '.join(prune_keys)})"
            )
    settings = PruneSettings(**{k: _typed(where, k, v) for k, v in data.items() if k in prune_keys})
    _check(settings, where)
    space = _search_space(data.get("search_space"), settings, where)
    fixed_and_searched = [k for k in space if k in data]
    if fixed_and_searched:
        raise SearchError(f"{where}: {fixed_and_searched[0]} is both fixed and in search_space; keep one")
    sampler = data.get("sampler", "grid" if all(isinstance(d, list) for d in space.values()) else "tpe")
    if sampler not in ("grid", "tpe"):
        raise SearchError(f"{where}: unknown sampler {sampler!r}; allowed: grid, tpe")
    if sampler == "grid" and not all(isinstance(d, list) for d in space.values()):
        raise SearchError(f"{where}: a grid needs a list of values for every parameter; use sampler: tpe for ranges")
    objectives, directions = _objectives(data, settings, where)
    grid_size = math.prod(len(d) for d in space.values()) if sampler == "grid" else None
    n_trials = n_trials if n_trials is not None else data.get("n_trials", grid_size)
    if n_trials is None:
        raise SearchError(f"{where}: n_trials missing; a TPE study needs it")
    spec = StudySpec(
        name=study_name or str(data.get("study_name") or path.stem),
        storage=storage or _config_storage(where, data),
        settings=settings,
        space=space,
        sampler=sampler,
        objectives=objectives,
        directions=directions,
        n_trials=_integer(where, "n_trials", n_trials),
        sampler_seed=data.get("sampler_seed") and _integer(where, "sampler_seed", data["sampler_seed"], minimum=0),
        **{k: _integer(where, k, data[k], minimum=0) for k in ("max_retry",) if k in data},
    )
    return spec


def _config_storage(where: str, data: dict) -> str:
    """The config's `storage` (a URL, file path or profile), else the default."""
    value = data.get("storage") or DEFAULT_STORAGE
    if not isinstance(value, str):
        raise SearchError(f"{where}: storage {value!r}; allowed: a database URL, a file path or a profile name")
    try:
        return profiles.storage(value)
    except profiles.ProfileError as err:
        raise SearchError(f"{where}: {err}") from None


def _integer(where: str, key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SearchError(f"{where}: {key} {value!r} out of range; allowed: an integer >= {minimum}")
    return value


def _typed(where: str, name: str, value):
    """`value` as the type of PruneSettings field `name` (ints stay ints; an int is a valid float)."""
    kind = _field_type(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SearchError(f"{where}: {name} {value!r} is not a {kind.__name__}")
    return value


def _check(settings: PruneSettings, where: str) -> None:
    try:
        settings.check()
    except ModelError as err:
        raise SearchError(f"{where}: {err}") from None


def _search_space(raw, settings: PruneSettings, where: str) -> dict:
    """The checked search space: every value (or range end) is a valid setting of its parameter."""
    if not isinstance(raw, dict) or not raw:
        raise SearchError(
            f"{where}: search_space missing; give a list of values (grid) or a range "
            "{low, high} (TPE) per parameter, e.g. taylor_seq_len: [16, 32, 64]"
        )
    space = {}
    for name, domain in raw.items():
        at = f"{where}: search_space.{name}"
        if name not in asdict(settings):
            raise SearchError(f"{at}: unknown parameter; allowed: {', '.join(asdict(settings))}")
        if isinstance(domain, list) and domain:
            values = [_typed(at, name, v) for v in domain]
            if len(set(values)) < len(values):
                raise SearchError(f"{at}: repeated value in {domain}")
        elif isinstance(domain, dict) and {"low", "high"} <= set(domain) <= {"low", "high", "step", "log"}:
            if _field_type(name) not in (int, float):
                raise SearchError(f"{at}: a range needs a numeric parameter; give a list of values")
            domain = {**domain, "low": _typed(at, name, domain["low"]), "high": _typed(at, name, domain["high"])}
            if domain["low"] >= domain["high"]:
                raise SearchError(f"{at}: low {domain['low']} must be below high {domain['high']}")
            values = [domain["low"], domain["high"]]
        else:
            raise SearchError(
                f"{at}: expected a non-empty list of values or a mapping with low, high "
                f"(and optionally step, log), got {domain!r}"
            )
        for value in values:
            _check(replace(settings, **{name: value}), at)
        space[name] = values if isinstance(domain, list) else domain
    return space


def _objectives(data: dict, settings: PruneSettings, where: str) -> tuple[list[str], list[str]]:
    """(objective metrics, directions); each objective must be a metric that prune runs log."""
    objectives = data.get("objective", "acc_mean")
    objectives = [objectives] if isinstance(objectives, str) else objectives
    if not isinstance(objectives, list) or not objectives or not all(isinstance(o, str) for o in objectives):
        raise SearchError(f"{where}: objective {data['objective']!r}; allowed: a metric name or a list of them")
    known = known_metrics(settings)
    for name in objectives:
        if name not in known:
            shown = ", ".join(sorted(m for m in known if not m.startswith("baseline_")))
            raise SearchError(f"{where}: unknown objective metric {name!r}; allowed: {shown}, or baseline_<score>")
    directions = data.get("direction") or [_default_direction(o, where) for o in objectives]
    directions = [directions] if isinstance(directions, str) else directions
    if len(directions) != len(objectives) or any(d not in ("maximize", "minimize") for d in directions):
        raise SearchError(
            f"{where}: direction {data.get('direction')!r}; allowed: maximize or minimize, one per objective ({len(objectives)})"
        )
    return objectives, directions


def _default_direction(metric: str, where: str) -> str:
    name = metric.removeprefix("baseline_")
    if name.startswith("acc"):
        return "maximize"
    if name.startswith("headline_mean"):
        return "maximize"
    if name.startswith(("ppl", "word_perplexity", "byte_perplexity", "bits_per_byte")):
        return "minimize"
    raise SearchError(f"{where}: direction missing for objective {metric!r}; allowed: maximize, minimize")


def known_metrics(settings: PruneSettings) -> set[str]:
    """Every metric a prune run with these settings can log (the possible objectives)."""
    tasks = parse_task_list(settings.tasks) + ([settings.ppl_task] if settings.ppl_task else [])
    scores = {names.metric(m, t) for t in tasks for kind in METRICS.values() for m in kind} | {"acc_mean", "headline_mean"}
    scores |= {"ppl"} if settings.ppl_task else set()
    counts = {names.metric("n", t) for t in tasks}
    return scores | {names.baseline_metric(s) for s in scores} | counts | set(GRAD_COLUMNS) | set(RUN_METRICS)
