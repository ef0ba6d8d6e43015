"""Render bench/results/*.json into the committed Markdown: `python -m bench.render`.

The README's per-machine and backbone-sweep tables, the benchmarks page (every results file) and the
backbones page (the newest backbone sweep and per-backbone cost) are written between markers
(`<!-- bench NAME:start -->` ... `<!-- bench NAME:end -->`) in the Markdown itself, so GitHub and the
docs site show the same figures; tests/test_docs.py fails while a page differs from what this renders.

Generic on purpose, so a results file of a new shape appears without new code. Per file: its date,
command and machine, then its figures as tables:

- `rows` (or any other list of objects): one table, a column per key (nested keys dotted);
- an object whose values are all objects (`runs: {cold: ..., warm: ...}`): one table with a
  column per member and a row per (dotted) key, so members compare side by side;
- any other object: a key / value table; scalars at the top level go into one such table;
- `notes`, `note`, `status` and other prose strings as text; a list of strings (log lines) as a
  text block; `table` (what `python -m bench` printed, Markdown) inside a collapsed block.

Nothing in the docs copies a figure by hand.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.targets import cold_run_limit, end_to_end_of_ceiling, judge

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = RESULTS_DIR.parent.parent
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


# The widest vector/matrix extension first: what tells the CPU classes this project runs on apart.
CPU_CLASSES = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))
README_START, README_END = "<!-- bench machines:start -->", "<!-- bench machines:end -->"
BACKBONES_START, BACKBONES_END = "<!-- bench backbones:start -->", "<!-- bench backbones:end -->"
SWEEP_START, SWEEP_END = "<!-- bench backbone-sweep:start -->", "<!-- bench backbone-sweep:end -->"
RESULTS_START, RESULTS_END = "<!-- bench results:start -->", "<!-- bench results:end -->"
# A docs page links a results file to its section of the benchmarks page (files outside docs/ are
# not part of the site); the README links the file itself.
PAGE_LINK = "benchmarks.md#{stem}"


def machine_label(machine: Mapping[str, Any]) -> str:
    """'AMD EPYC (AVX2)' or 'NVIDIA H200 (Intel(R) Xeon(R) Processor)': the class a row stands for."""
    flags = machine.get("cpu_flags_of_note")
    if flags is not None:
        kind = next((name for flag, name in CPU_CLASSES if flag in flags), "no AVX2")
    else:  # files from before the flags were recorded: only whether bf16 was advertised
        kind = "bf16 advertised" if machine.get("bf16") else "no bf16"
    cpu = f"{machine.get('cpu', '?')} ({kind})"
    return f"{machine['gpu']} (host {machine.get('cpu', '?')})" if machine.get("gpu") else cpu


def _bench_files(results_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The `python -m bench` results files (those with targets and a machine), oldest first."""
    files = []
    for path in _dated(results_dir, "*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "targets" in data and isinstance(data.get("machine"), dict):
            files.append((path, data))
    return files


def _newest_per_class(files: list[tuple[Path, dict[str, Any]]]) -> list[tuple[Path, dict[str, Any]]]:
    """Per machine class, the newest full run (the newest quick one where a class has no full run)."""
    best: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path, data in files:  # oldest first: a later file of the same standing replaces an earlier one
        label = machine_label(data["machine"])
        held = best.get(label)
        if held is None or data.get("mode") == "full" or held[1].get("mode") != "full":
            best[label] = (path, data)
    kept = {path for path, _ in best.values()}
    return [(path, data) for path, data in files if path in kept]


def machines_table(results_dir: Path = RESULTS_DIR, link_files: bool = False, per_class: bool = False) -> str:
    """One row per `python -m bench` results file (`per_class`: per machine class, its newest full
    run): the figures its targets are judged on, judged against the targets in force
    (bench/targets.py; a file's own `targets` are what it was judged against when it ran). Each row
    links to its file's section of the benchmarks page, or (`link_files`) to the file."""

    rows = []
    files = _bench_files(results_dir)
    for path, data in _newest_per_class(files) if per_class else files:
        get = flatten(data).get
        targets = {k: v for k, v in judge(data).items() if v is not None}
        missed = [k for k, v in targets.items() if not v]
        extraction = get("runs.cold.extraction.candidate") or get("runs.cold.precision")
        rows.append(
            [
                f"[`{path.stem}`]({f'bench/results/{path.name}' if link_files else f'#{path.stem.lower()}'})",
                machine_label(data["machine"]),
                data.get("mode"),
                round((get("machine.load_average_start") or [math.nan])[0], 1),
                extraction,
                get("throughput.tutorial.img_per_s"),
                get("throughput.ours.img_per_s"),
                data.get("ratio"),
                get("end_to_end.ratio"),
                get("ceiling.fraction"),
                end_to_end_of_ceiling(data),
                get("runs.cold.wall_s"),
                cold_run_limit(data),
                get("runs.warm.wall_s"),
                get("head_epoch.seconds"),
                f"{len(targets) - len(missed)} of {len(targets)}" + (f"; not: {', '.join(missed)}" if missed else ""),
            ]
        )
    header = [
        "results file",
        "machine",
        "mode",
        "load",
        "extraction",
        "tutorial img/s",
        "extraction img/s",
        "vs tutorial",
        "vs tutorial, end to end",
        "of ceiling",
        "of ceiling, end to end",
        "cold run s",
        "cold run target s",
        "warm run s",
        "head epoch s",
        "targets met",
    ]
    return "\n".join(table(header, rows))


def backbones_table(results_dir: Path = RESULTS_DIR, link: str = "bench/results/{name}") -> str:
    """The newest `python -m bench --backbones` file as a table, with the machine and command it ran under.
    `link` formats the file's link ({name}: the file name, {stem}: without .json, lower case)."""
    path = _newest(results_dir, "*-backbones.json")
    if path is None:
        return "No `python -m bench --backbones` results yet."
    data = json.loads(path.read_text())
    machine = data.get("machine", {})
    header = ["backbone", "image px", "feature dim", "params (M)", "GFLOP / image", "extraction img/s", "peak RSS GB"]
    keys = ["backbone", "image_size", "feature_dim", "params_m", "gflop_per_image", "img_per_s", "peak_rss_gb"]
    lines = [
        f"Measured {data.get('date', '?')} on {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores "
        f"([`{path.name}`]({link.format(name=path.name, stem=path.stem.lower())})): `{data.get('command', '?')}`",
        "",
        *table(header, ([row.get(k) for k in keys] for row in data["rows"])),
    ]
    return "\n".join(lines)


def backbone_sweep_table(results_dir: Path = RESULTS_DIR, link: str = "bench/results/{name}") -> str:
    """The newest `python -m bench.backbone_sweep` file: its sweep command and the jobs as its summary ranked them.
    `link` formats the file's link ({name}: the file name, {stem}: without .json)."""
    path = _newest(results_dir, "*-backbone-sweep.json")
    if path is None:
        return "No `python -m bench.backbone_sweep` results yet."
    data = json.loads(path.read_text())
    machine, objective = data.get("machine", {}), data.get("objective", "val/acc")
    load = (machine.get("load_average_start") or [math.nan])[0]

    def fixed(value: Any, digits: int) -> Any:
        return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else value

    header = ["rank", "backbone", "status", objective, "test/acc", "epochs", "extract img/s", "wall s"]
    rows = [
        [
            r.get("rank"),
            r.get("model"),
            r.get("status"),
            fixed(r.get(objective), 4),
            fixed(r.get("test/acc"), 4),
            r.get("epochs"),
            fixed(r.get("extraction_img_per_s"), 1),
            fixed(r.get("wall_time_s"), 1),
        ]
        for r in data["rows"]
    ]
    lines = [
        f"Run {data.get('date', '?')} on {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, load "
        f"{load:.1f} at the start ([`{path.name}`]({link.format(name=path.name, stem=path.stem.lower())})):",
        f"`{data.get('sweep_command', '?')}`",
        "",
        *table(header, rows),
    ]
    return "\n".join(lines)


def markdown_blocks(results_dir: Path = RESULTS_DIR) -> dict[str, list[tuple[str, str, Callable[[], str]]]]:
    """Per committed Markdown file (relative to the repository), its rendered blocks: (start, end, body)."""
    return {
        "README.md": readme_blocks(results_dir),
        "docs/benchmarks.md": [(RESULTS_START, RESULTS_END, lambda: render(results_dir))],
        "docs/backbones.md": [
            (SWEEP_START, SWEEP_END, lambda: backbone_sweep_table(results_dir, link=PAGE_LINK)),
            (BACKBONES_START, BACKBONES_END, lambda: backbones_table(results_dir, link=PAGE_LINK)),
        ],
    }


def readme_blocks(results_dir: Path = RESULTS_DIR) -> list[tuple[str, str, Callable[[], str]]]:
    return [
        (README_START, README_END, lambda: machines_table(results_dir, link_files=True, per_class=True)),
        (SWEEP_START, SWEEP_END, lambda: backbone_sweep_table(results_dir)),
    ]


def rendered(path: Path, blocks: list[tuple[str, str, Callable[[], str]]]) -> str:
    """The text of `path` with each block's body between its markers."""
    from fmnist_tl.core import replace_between  # not for render(): it imports torch

    text = path.read_text()
    for start, end, body in blocks:
        filled = replace_between(text, start, end, f"\n{body()}")
        if filled is None:
            raise SystemExit(f"error: {path} has no {start} ... {end} block; add one where the table goes")
        text = filled
    return text


def fill(path: Path, blocks: list[tuple[str, str, Callable[[], str]]]) -> bool:
    """Write the rendered blocks into `path`; True when the file changed."""
    from fmnist_tl.core import atomic_write_text

    new = rendered(path, blocks)
    if new == path.read_text():
        return False
    atomic_write_text(path, new)
    return True


def fill_readme(readme: Path, results_dir: Path = RESULTS_DIR) -> bool:
    """Put machines_table(), backbones_table() and backbone_sweep_table() between the README's markers;
    True when the file changed."""
    return fill(readme, readme_blocks(results_dir))


def _dated(results_dir: Path, pattern: str) -> list[Path]:
    """The results files matching `pattern`, oldest first: by their recorded date, then by name."""
    return sorted(results_dir.glob(pattern), key=lambda p: (_date_of(p), p.name))


def _newest(results_dir: Path, pattern: str) -> Path | None:
    """The results file matching `pattern` with the latest date (then name), or None."""
    files = _dated(results_dir, pattern)
    return files[-1] if files else None


def _date_of(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("date") or "")
    except (ValueError, AttributeError):
        return ""


def render(results_dir: Path = RESULTS_DIR) -> str:
    """Every results file, newest date first, as one Markdown document (no top heading)."""
    files = _dated(results_dir, "*.json")[::-1]
    if not files:
        return f"No results files in `{results_dir.name}/` yet.\n"
    lines = [
        "## One row per bench run",
        "",
        machines_table(results_dir),
        "Files: " + ", ".join(f"[`{p.name}`](#{p.stem.lower()})" for p in files),
        "",
    ]
    for path in files:
        lines += render_file(path)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme", type=Path, help="instead: fill only this README's tables")
    parser.add_argument("--print", action="store_true", help="instead: print the benchmarks page's Markdown")
    args = parser.parse_args()
    if args.print:
        print(render(args.results_dir))
        return
    files = {args.readme: readme_blocks(args.results_dir)} if args.readme else None
    for path, blocks in (files or {REPO / k: v for k, v in markdown_blocks(args.results_dir).items()}).items():
        name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        print(f"{name}: {'updated' if fill(path, blocks) else 'already current'}")


if __name__ == "__main__":
    main()
