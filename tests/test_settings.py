"""Each entry point's settings are declared once (a dataclass, contract.cli): MLproject, the command line,
`--help` and the parameter tables of docs/parameters.md (generated from it) agree with it.

Convention: the module an MLproject command runs (`python -m <module>`) has a module-level `parser()`
whose options are its settings' fields (plus the options in NOT_IN_MLPROJECT), and answers `--help`
without importing torch.
"""

import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contract import cli

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
NOT_IN_MLPROJECT = {"tracking_uri"}  # for direct runs only: `mlflow run` sets the tracking store itself
HEAVY = ("torch", "transformers")  # what `--help` must not load


def module_of(entry: str) -> str:
    return re.match(r"python -m ([\w.]+)", ENTRY_POINTS[entry]["command"]).group(1)


def options(entry: str) -> dict:
    """The entry point's command-line options by name (argparse actions), `--help` left out."""
    parser = importlib.import_module(module_of(entry)).parser()
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def parsed(action, text: str):
    """`text` as the option's type parses it."""
    return action.type(text) if action.type else text


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_mlproject_parameters_are_the_entry_points_settings(entry):
    params, opts = ENTRY_POINTS[entry]["parameters"], options(entry)
    assert set(params) == set(opts) - NOT_IN_MLPROJECT, entry
    for name, spec in params.items():
        action = opts[name]
        if "default" not in spec:
            assert action.required, f"{entry}.{name}: MLproject requires it, the settings give a default"
            continue
        assert not action.required, f"{entry}.{name}: the settings require it, MLproject gives a default"
        assert parsed(action, str(spec["default"])) == action.default, f"{entry}.{name}"
        assert action.help, f"{entry}.{name} has no help text"
    for name in NOT_IN_MLPROJECT & set(opts):
        assert opts[name].help and not opts[name].required, f"{entry}.{name}"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_the_command_passes_every_parameter_through(entry):
    from mlflow.projects._project_spec import load_project

    command = ENTRY_POINTS[entry]["command"]
    for name in ENTRY_POINTS[entry]["parameters"]:
        assert re.search(rf"--{name} \{{{name}\}}(\s|$)", command), f"{entry}: --{name} {{{name}}} missing or quoted"
    # what `mlflow run` executes with the defaults (it shell-quotes each value) parses back to the defaults
    given = {name: "s3://bucket/x" for name, spec in ENTRY_POINTS[entry]["parameters"].items() if "default" not in spec}
    argv = shlex.split(load_project(ROOT).get_entry_point(entry).compute_command(given, None))
    assert argv[:3] == ["python", "-m", module_of(entry)]
    args = importlib.import_module(module_of(entry)).parser().parse_args(argv[3:])
    for name, action in options(entry).items():
        expected = parsed(action, given[name]) if name in given else action.default
        assert getattr(args, name) == expected, f"{entry}.{name}"


@pytest.mark.parametrize("module", sorted({module_of(e) for e in ENTRY_POINTS}))
def test_help_shows_every_default_without_importing_torch(module):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not [m for m in imported if m.split(".")[0] in HEAVY], f"{module} --help imports {HEAVY}"
    text = " ".join(proc.stdout.split())
    parser = importlib.import_module(module).parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert re.search(rf"--{action.dest} .*?\(default: ", text), f"{module} --{action.dest}"


def test_booleans_are_true_or_false():
    assert cli.parse_bool("true") is True and cli.parse_bool("FALSE") is False
    for text in ("yes", "1", "0", ""):
        with pytest.raises(ValueError):
            cli.parse_bool(text)
    from search.prune import parser

    with pytest.raises(cli.UsageError, match="baseline 'yes' is not valid; allowed: true, false"):
        parser().parse_args(["--baseline", "yes"])
    alone = parser().parse_args(["--save_model", "--baseline", "false"])  # a flag alone means true
    assert alone.save_model is True and alone.baseline is False


def docs_hooks():
    """docs/hooks.py, the MkDocs hook that generates the docs' parameter tables."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_the_docs_parameter_tables_are_the_settings(entry):
    assert f"<!-- parameters: {entry} -->" in (ROOT / "docs" / "parameters.md").read_text()
    table = docs_hooks().parameters(entry).splitlines()[2:]
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table]
    documented = {name.strip("`"): default.strip("`") for name, default, *_ in rows}
    opts = options(entry)
    assert set(documented) == set(opts), entry
    for name, default in documented.items():
        action = opts[name]
        if default == "(required)":
            assert action.required, f"{entry}.{name}"
        elif default == "":
            assert action.default in ("", None), f"{entry}.{name}"
        else:
            assert parsed(action, default) == action.default, f"{entry}.{name}"
