"""Render every bench/results/*.json as Markdown: the docs' benchmarks page (`python -m bench.render`).

Generic on purpose, so a results file of a new shape appears without new code. Per file: its date,
command and machine, then its figures as tables:

- `rows` (or any other list of objects): one table, a column per key (nested keys dotted);
- an object whose values are all objects (`runs: {cold: ..., warm: ...}`): one table with a
  column per member and a row per (dotted) key, so members compare side by side;
- any other object: a key / value table; scalars at the top level go into one such table;
- `notes`, `note`, `status` and other prose strings as text; a list of strings (log lines) as a
  text block; `table` (what `python -m bench` printed, Markdown) inside a collapsed block.

mkdocs builds the page through the hook in docs/hooks.py; nothing in the docs copies a figure by hand.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HEADER_KEYS = ("date", "command", "machine", "cpu")
PROSE_KEYS = ("status", "note", "notes", "description")


def cell(value: Any) -> str:
    """One value as a Markdown table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.6g}"
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict | list):
        value = json.dumps(value, separators=(", ", ": "))
    return str(value).replace("|", "\\|").replace("\n", " ")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested objects as {"a.b.c": leaf}; lists of objects by index ("rounds.0.ratio")."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        out = {}
        for i, inner in enumerate(value):
            out.update(flatten(inner, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: value}


def table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _columns(records: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    return columns


def records_table(items: list[Any]) -> list[str]:
    """A list of objects: a row each, a column per (dotted) key."""
    records = [flatten(item) if isinstance(item, dict) else {"value": item} for item in items]
    columns = _columns(records)
    return table(columns, ([r.get(c) for c in columns] for r in records))


def members_table(members: Mapping[str, Any]) -> list[str]:
    """An object of objects: a column per member, a row per (dotted) key."""
    flat = {name: flatten(member) for name, member in members.items()}
    keys = _columns(list(flat.values()))
    return table(["", *flat], ([key, *(f.get(key) for f in flat.values())] for key in keys))


def _is_prose(key: str, value: Any) -> bool:
    return isinstance(value, str) and (key in PROSE_KEYS or len(value) > 100 or "\n" in value)


def render_file(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        data = {"rows": data}
    lines = [f"## {path.stem}", "", f"File: `bench/results/{path.name}`", ""]
    if data.get("date"):
        lines += [f"Date: {data['date']}", ""]
    if data.get("command"):
        lines += [f"Command: `{data['command']}`", ""]
    machine = data.get("machine", data.get("cpu"))
    if isinstance(machine, dict):
        lines += ["Machine: " + "; ".join(f"{k} {cell(v)}" for k, v in flatten(machine).items()), ""]
    elif machine is not None:
        lines += [f"Machine: {cell(machine)}", ""]
    scalars: list[list[Any]] = []
    sections: list[str] = []
    for key, value in data.items():
        if key in HEADER_KEYS or key == "table":
            continue
        if _is_prose(key, value):
            lines += [f"**{key}**: {value}" if "\n" not in value else f"**{key}**:\n\n{value}", ""]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            sections += [f"### {key}", "", "```text", *value, "```", ""]
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            sections += [f"### {key}", "", *records_table(value)]
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            sections += [f"### {key}", "", *members_table(value)]
        elif isinstance(value, dict) and value:
            sections += [f"### {key}", "", *table(["key", "value"], ([k, v] for k, v in flatten(value).items()))]
        elif value not in ({}, []):
            scalars.append([key, value])
    if scalars:
        lines += table(["figure", "value"], scalars)
    lines += sections
    if isinstance(data.get("table"), str):
        printed = "\n".join("    " + line if line else "" for line in data["table"].splitlines())
        lines += ['??? note "As the benchmark printed it"', "", printed, ""]
    return lines


def _date_of(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("date") or "")
    except (ValueError, AttributeError):
        return ""


def render(results_dir: Path = RESULTS_DIR) -> str:
    """Every results file, newest date first, as one Markdown document (no top heading)."""
    files = sorted(results_dir.glob("*.json"), key=lambda p: (_date_of(p), p.name), reverse=True)
    if not files:
        return f"No results files in `{results_dir.name}/` yet.\n"
    lines = ["Files: " + ", ".join(f"[`{p.name}`](#{p.stem.lower()})" for p in files), ""]
    for path in files:
        lines += render_file(path)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    print(render(parser.parse_args().results_dir))


if __name__ == "__main__":
    main()
