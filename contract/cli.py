"""Command lines: settings declared once as a dataclass, parsed with one-line errors, run as an entry point.

An entry point declares its parameters once, as a dataclass whose fields are made with `setting`
(default and help text); `parser_for` builds the argparse parser (and `--help`, with defaults)
from it, and `settings_from` the dataclass back from the parsed arguments. MLproject names the
same parameters with the same defaults (tests/test_settings.py checks it). Booleans are written
`true` or `false`. `run_main` runs an entry point: a user error is one line `error: ...` and exit 2.
This module loads neither MLflow nor torch: an entry point answers `--help` and rejects a bad
argument before its heavy imports (`check_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys

REQUIRED = dataclasses.MISSING  # the default of a setting that must be given


class UsageError(ValueError):
    """A command-line argument that cannot be parsed."""


def setting(default, help: str, choices: tuple | None = None):
    """A dataclass field that is also a command-line option: its default (`REQUIRED`: none), help text and
    allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def parse_bool(text: str) -> bool:
    """`true` or `false` (any case), the one boolean convention of every entry point."""
    if str(text).lower() in ("true", "false"):
        return str(text).lower() == "true"
    raise ValueError(f"{text!r} is not a boolean")


def optional_int(text: str) -> int | None:
    """An integer, or None for an empty value."""
    if str(text).strip() == "":
        return None
    return int(text)


_PARSE = {"str": str, "int": int, "float": float, "bool": parse_bool, "int | None": optional_int}
_ALLOWED = {"int": "an integer", "float": "a number", "optional_int": "an integer or empty", "parse_bool": "true, false"}


def add_settings(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """Add one `--<field>` option per field of dataclass `cls` (made with `setting`)."""
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind not in _PARSE:
            raise TypeError(f"{cls.__name__}.{f.name}: type {kind} has no command-line form; allowed: {', '.join(_PARSE)}")
        required = f.default is REQUIRED
        parser.add_argument(
            f"--{f.name}",
            type=_PARSE[kind],
            default=argparse.SUPPRESS if required else f.default,
            required=required,
            choices=f.metadata.get("choices"),
            help=f.metadata.get("help", ""),
            **({"metavar": "{true,false}", "nargs": "?", "const": True} if kind == "bool" else {}),  # `--flag` alone: true
        )
    return parser


def parser_for(*classes, description: str) -> ArgumentParser:
    """The parser of an entry point whose settings are the fields of `classes`."""
    parser = ArgumentParser(description=description)
    for cls in classes:
        add_settings(parser, cls)
    return parser


def settings_from(cls, args: argparse.Namespace):
    """The `cls` dataclass filled from parsed arguments (fields only; other options are ignored)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class TrackingSettings:
    """The option of every entry point that MLproject does not pass (`mlflow run` sets the store itself)."""

    tracking_uri: str = setting(
        "",
        "tracking URI or profile (mlruns_config/profiles/<name>.yaml or a .yaml path); "
        "overrides $PRUNETRACK_PROFILE, then $MLFLOW_TRACKING_URI",
    )


def check_args(parser) -> None:
    """For `python -m <entry module>`, before the module's heavy imports (torch, MLflow): answer `--help`, or
    reject a bad argument (one line, exit 2), with `parser()` alone."""
    if run_main(parser().parse_args):
        raise SystemExit(2)


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default, booleans written as the command line takes them (true, false)."""

    def _get_help_string(self, action):
        if isinstance(action.default, bool):
            return f"{action.help} (default: {str(action.default).lower()})"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`UsageError`, no usage block) that name the value and what is
    allowed. An option named `storage` also accepts a profile (contract.profiles.storage). `--help`
    shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _ShowDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        match = re.fullmatch(r"argument --?(\w+)(?:/\S+)?: invalid (\w+) value: (.*)", message)
        if match:
            name, kind, value = match.groups()
            raise UsageError(f"{name} {value} is not valid; allowed: {_ALLOWED.get(kind, f'a {kind} value')}")
        match = re.fullmatch(r"argument --?(\w+)(?:/\S+)?: invalid choice: (.*) \(choose from (.*)\)", message)
        if match:
            name, value, choices = match.groups()
            allowed = choices.replace("'", "")
            raise UsageError(f"{name} {value} is not valid; allowed: {allowed}")
        match = re.fullmatch(r"argument --?(\w+)(?:/\S+)?: (.*)", message)
        if match:
            raise UsageError(f"{match.group(1)}: {match.group(2)}")
        raise UsageError(f"{message}; allowed: the options of {self.prog} --help")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if isinstance(getattr(namespace, "storage", None), str):
            from contract import profiles

            try:
                namespace.storage = profiles.storage(namespace.storage)
            except profiles.ProfileError as err:
                raise UsageError(str(err)) from None
        return namespace, extra


STOP_SIGNALS = ("SIGINT", "SIGTERM")


def _on_stop(signum, frame):
    """Ctrl-C (SIGINT) or SIGTERM: stop with KeyboardInterrupt or Terminated. From now on both are ignored:
    `mlflow run` answers Ctrl-C with a SIGTERM to its child, which must not cut the clean-up short."""
    from contract import tracking

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    tracking.defer_stops = True  # the runs in flight are ended together, by run_main (tracking.stop_in_flight)
    raise tracking.Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _die_with_launcher() -> None:
    """Under `mlflow run` on Linux: a SIGTERM when the launcher dies (prctl PR_SET_PDEATHSIG), so that the
    search stops and marks its runs KILLED rather than computing on, orphaned."""
    if not os.environ.get("MLFLOW_RUN_ID") or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the launcher's death is not noticed
        return
    if os.getppid() == 1:  # the launcher died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


class _Format(logging.Formatter):
    """`warning: ...` and `error: ...` prefixes; progress and notes (INFO) as plain lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to sys.stderr as it is when a record comes, not as it was at set-up:
    entry points run in-process (tests, notebooks) may swap and close sys.stderr in between."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def show_logs(packages: tuple = ("pruning", "contract", "search", "analysis", "benchmarks")) -> None:
    """Send the project's log records (INFO and up) to stderr, once; libraries keep their own settings."""
    for name in packages:
        package = logging.getLogger(name)
        if not package.handlers:
            handler = _CurrentStderr()
            handler.setFormatter(_Format("%(message)s"))
            package.addHandler(handler)
            package.setLevel(logging.INFO)
            package.propagate = False


def run_main(main, argv=None, user_errors: tuple = ()) -> int:
    """Run `main(argv)` as an entry point. A user error (`user_errors`, a bad argument, an unusable store
    or profile) becomes one line `error: ...` on stderr and exit code 2. Ctrl-C and SIGTERM (also the
    launcher's death under `mlflow run`) end every run in flight KILLED with the reason, in one batch that
    a second signal cannot cut short (exit 130 / 143). Under `mlflow run`, the run it created ends FAILED
    (KILLED when stopped) with `prunetrack.error`, whatever ended the process; when it holds a password
    in a param, it is deleted and purged instead."""
    show_logs()
    previous = {}
    if _in_main_thread():
        previous = {name: signal.signal(getattr(signal, name), _on_stop) for name in STOP_SIGNALS if hasattr(signal, name)}
        _die_with_launcher()
    try:
        main(argv)
    except Exception as err:
        from contract import launcher, profiles, stores, tracking  # here, not above: `--help` loads no MLflow

        purged = launcher.forget_secret_launcher_run()
        if not purged:
            launcher.fail_launcher_run(err)
        if not isinstance(err, (*user_errors, UsageError, stores.TrackingError, profiles.ProfileError)):
            raise  # a bug: the traceback stays, the run says why it failed
        print(f"error: {err}{f'; {purged}' if purged else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        from contract import launcher, tracking

        print(f"error: {tracking.stop_reason(err).split(' before')[0]}; {tracking.stop_in_flight(err)}", file=sys.stderr)
        launcher.fail_launcher_run(err)
        return 143 if isinstance(err, tracking.Terminated) else 130
    except BaseException as err:  # SystemExit (`--help`: code 0)
        if not (isinstance(err, SystemExit) and not err.code):
            from contract import launcher

            launcher.fail_launcher_run(err)
        raise
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
        tracking = sys.modules.get("contract.tracking")  # not imported by `--help`
        if tracking is not None:  # the next entry point run in this process starts with nothing in flight
            tracking.forget_in_flight()
    return 0


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def ignore_in_checkout(folder: str) -> None:
    """Keep an output folder written inside a git checkout out of git: a `.gitignore` of `*` in it."""
    from pathlib import Path

    path = Path(folder).resolve()
    if any((p / ".git").exists() for p in (path, *path.parents)) and not (path / ".gitignore").exists():
        (path / ".gitignore").write_text("# written by prunetrack: outputs stay out of git\n*\n")
