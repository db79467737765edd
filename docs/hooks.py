"""MkDocs hook: pages say what to generate with a marker, and the tables come from the code and results.

A marker is an HTML comment on a line of its own:

- `<!-- parameters: beam_search -->`: the entry point's parameters (name, default, allowed values, help),
  read from the command line of the module MLproject's `command` runs, which `contract.cli` builds from
  the settings dataclasses; so a parameter is declared once, in search/settings.py or analysis/settings.py.
- `<!-- names: contract -->`: every constant of contract/names.py with its value and comment, and every
  name pattern (the functions) with its docstring.
- `<!-- include: benchmarks/results/latest.md -->`: a file of the repository, as it is.
- `<!-- racing_step: benchmarks/results/racing_step.json -->`: the racing replay's results as a table.

An unknown marker, entry point or file fails the build.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- (\w+): (\S+) -->$", re.MULTILINE)


class MarkerError(ValueError):
    """A marker that names nothing this hook can generate."""


def entry_module(entry: str) -> str:
    """The module MLproject's command of `entry` runs (`python -m <module>`)."""
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    if entry not in entry_points:
        raise MarkerError(f"unknown entry point {entry!r}; allowed: {', '.join(entry_points)}")
    return re.match(r"python -m ([\w.]+)", entry_points[entry]["command"]).group(1)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _allowed(action: argparse.Action) -> str:
    from contract import cli

    if action.choices:
        return ", ".join(f"`{c}`" for c in action.choices)
    kind = getattr(action.type, "__name__", "str")
    return cli._ALLOWED.get(kind, "text")


def parser_of(module: str) -> argparse.ArgumentParser:
    """The command line of entry-point module `module`: its `parser()`, imported from where the module
    imports it (search/settings.py, analysis/settings.py), so that the build never loads torch."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == "parser":
                    return getattr(importlib.import_module(node.module), alias.name)()
    return importlib.import_module(module).parser()


def parameters(entry: str) -> str:
    """The parameter table of MLproject entry point `entry`."""
    parser = parser_of(entry_module(entry))
    rows = ["| parameter | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if action.required:
            default = "(required)"
        elif isinstance(action.default, bool):
            default = f"`{str(action.default).lower()}`"
        elif action.default in ("", None):
            default = ""
        else:
            default = f"`{action.default}`"
        meaning = action.help + (
            " (direct runs only; `mlflow run` sets the store itself)" if action.dest == "tracking_uri" else ""
        )
        rows.append(f"| `{action.dest}` | {default} | {_allowed(action)} | {_cell(meaning)} |")
    return "\n".join(rows)


def names(module: str) -> str:
    """The names of the tracking contract: constants with their values under their section's comment, then the
    name patterns (the functions) with their docstrings."""
    if module != "contract":
        raise MarkerError(f"unknown names {module!r}; allowed: contract")
    from contract import names as contract_names

    source = inspect.getsource(contract_names)
    lines = source.splitlines()
    rows = ["| constant | value | section | note |", "| --- | --- | --- | --- |"]
    section = ""
    for node in ast.parse(source).body:
        if not isinstance(node, ast.Assign):
            continue
        above = lines[node.lineno - 2] if node.lineno > 1 else ""
        section = above[2:].strip() if above.startswith("# ") else section
        note = lines[node.lineno - 1].split("  # ", 1)[1].strip() if "  # " in lines[node.lineno - 1] else ""
        targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
        for target in targets:
            rows.append(f"| `{target.id}` | `{getattr(contract_names, target.id)}` | {_cell(section)} | {_cell(note)} |")
    rows += ["", "| pattern | name | what it names |", "| --- | --- | --- |"]
    for name, function in inspect.getmembers(contract_names, inspect.isfunction):
        if function.__module__ != contract_names.__name__:
            continue
        params = [n for n, p in inspect.signature(function).parameters.items() if p.default is inspect.Parameter.empty]
        doc = " ".join(inspect.getdoc(function).split())
        rows.append(f"| `{name}({', '.join(params)})` | `{function(*(f'<{p}>' for p in params))}` | {_cell(doc)} |")
    return "\n".join(rows)


def include(path: str) -> str:
    """A file of the repository, as it is."""
    file = ROOT / path
    if not file.is_file():
        raise MarkerError(f"no file {path!r} to include")
    return file.read_text()


def racing_step(path: str) -> str:
    """The racing replay of one beam step (benchmarks.racing_step's JSON) as a table, with its machine and date."""
    data = json.loads(include(path))
    tasks = ", ".join(f"{task} {spec['n']}" for task, spec in data["tasks"].items())
    total = data["candidates"] * data["looks"][-1]
    rows = [
        f"{data['model']}, {data['candidates']} candidates (one beam step), {tasks} examples; looks after "
        f"{', '.join(map(str, data['looks']))} examples per candidate (all tasks); ceiling {data['ceiling']:.2f}x "
        f"(every candidate outside the beam stopped at the first look); {data['device']}; {data['date']}.",
        "",
        "| rule | example-configurations | vs exhaustive | stopped | same beam |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rule, result in data.items():
        if isinstance(result, dict) and "example_configs" in result:
            rows.append(
                f"| {rule} | {result['example_configs']:,} of {total:,} | {result['ratio']:.2f}x fewer | "
                f"{result['stopped']} of {data['candidates']} | {'yes' if result['same_beam'] else 'no'} |"
            )
    return "\n".join(rows)


GENERATORS = {"parameters": parameters, "names": names, "include": include, "racing_step": racing_step}


def expand(markdown: str) -> str:
    """`markdown` with every marker replaced by what it names."""

    def one(match: re.Match) -> str:
        kind, argument = match.groups()
        if kind not in GENERATORS:
            raise MarkerError(f"unknown marker {kind!r}; allowed: {', '.join(GENERATORS)}")
        return GENERATORS[kind](argument)

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs event: expand the page's markers (an error fails the build)."""
    try:
        return expand(markdown)
    except MarkerError as error:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{page.file.src_path}: {error}") from error
