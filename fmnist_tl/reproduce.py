"""The project's headline results in one command: `python -m fmnist_tl.reproduce [OVERRIDES...]` (`make reproduce`).

Runs each of EXPERIMENTS as its own `python -m fmnist_tl.train` process (a CLI, so nothing here
imports it; each job gets Hydra's usual run dir, log and config), with the OVERRIDES (e.g.
`trainer=gpu`). Then it writes docs/results.md from their metrics.json and report.json, and the
README's results table between its README_MARKERS.

Every config is composed and checked, and the ImageNet weights fetched, before the first job
starts: offline without them it stops at once with train's one-line weights error (exit 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig

from fmnist_tl.backbones import fetch_torchvision_weights
from fmnist_tl.config import compose_config
from fmnist_tl.core import FmnistError, atomic_write_text, cpu_model, replace_between
from fmnist_tl.runtime import task_wrapper, validate_config


@dataclass(frozen=True)
class Experiment:
    name: str
    overrides: tuple[str, ...]
    what: str


EXPERIMENTS = (
    Experiment("notebook", ("experiment=notebook",), "the notebook: frozen ResNet50, head only"),
    Experiment("finetune", ("experiment=finetune",), "head epochs, then layer4 fine-tuned"),
    Experiment("default", (), "`make train`: the default config"),
)
DEFAULT_OUTPUT = Path("docs/results.md")
DEFAULT_README = Path("README.md")
README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


def _composed(experiment: Experiment, overrides: Sequence[str]) -> DictConfig:
    # Hydra's own keys (hydra.*) only exist inside a Hydra run; they are checked when the job starts.
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    return compose_config("train", [*experiment.overrides, *plain])


def preflight(experiments: Sequence[Experiment], overrides: Sequence[str]) -> dict[str, DictConfig]:
    """Compose and check every job's config, and get its torchvision weights, before any job runs."""
    configs = {}
    for experiment in experiments:
        cfg = _composed(experiment, overrides)
        validate_config(cfg)
        m = cfg.model
        if m.weights is not None and m.weights_path is None:
            # The same fetch (or one-line offline error) the job's model would do, once, up front.
            fetch_torchvision_weights(m.backbone, m.weights)
        configs[experiment.name] = cfg
    return configs


def train_command(experiment: Experiment, run_dir: Path, overrides: Sequence[str]) -> list[str]:
    return ["python", "-m", "fmnist_tl.train", *experiment.overrides, f"hydra.run.dir={run_dir}", *overrides]


def run_job(command: list[str], run_dir: Path) -> dict[str, Any]:
    """Run one training job; its metrics.json and report.json, or a one-line error."""
    proc = subprocess.run([sys.executable, *command[1:]], check=False)
    if proc.returncode != 0:
        raise FmnistError(f"{shlex.join(command)} failed (exit {proc.returncode}); its log: {run_dir / 'train.log'}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report_file = run_dir / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    return {"metrics": metrics, "report": report}


def machine() -> dict[str, str]:
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "gpu": ", ".join(gpus) if gpus else "none",
        "software": (
            f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
        ),
    }


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}%"


def _headline_cells(name: str, run: dict[str, Any]) -> list[Any]:
    """run, what, test accuracy, macro-F1, epochs: the cells the results page and the README table share."""
    m = run["metrics"]
    f1 = "-" if m.get("test/f1") is None else format(float(m["test/f1"]), ".4f")
    return [name, run["what"], _percent(m.get("test/acc")), f1, m.get("epochs", "-")]


def _wall(seconds: Any) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(float(seconds), 60)
    return f"{float(seconds):.0f} s" if minutes < 1 else f"{float(seconds):.0f} s ({int(minutes)} min {secs:.0f} s)"


def results_markdown(runs: dict[str, dict[str, Any]], reproduce_command: str, when: str, host: dict[str, str]) -> str:
    """docs/results.md from the jobs' metrics.json and report.json (`runs`: name -> what run_job read)."""
    random_init = [name for name, run in runs.items() if "random" in str(run["metrics"].get("weights_id", ""))]
    lines = [
        "# Results",
        "",
        f"Written by `{reproduce_command}` on {when}, from the metrics.json and report.json of the runs",
        "below; rerun it to refresh this page (`make reproduce`), do not edit it by hand.",
        "",
    ]
    if random_init:
        lines += [
            f'!!! warning "Random-init backbone in {", ".join(random_init)}"',
            "    These runs did not use ImageNet weights (`model.weights=null`), so they say nothing about",
            "    the accuracy transfer learning reaches.",
            "",
        ]
    lines += [
        f"Machine: CPU {host['cpu']}; GPU {host['gpu']}; {host['software']}.",
        "",
        "| run | what | test accuracy | macro-F1 | epochs | wall time | precision | weights |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, run in runs.items():
        m = run["metrics"]
        cells = [*_headline_cells(name, run), _wall(m.get("wall_time_s")), m.get("precision", "-")]
        lines.append("| " + " | ".join(map(str, [*cells, f"`{m.get('weights_id', '-')}`"])) + " |")
    reports = {name: run["report"] for name, run in runs.items() if run["report"]}
    if reports:
        classes = next(iter(reports.values()))["class_names"]
        lines += ["", "## Per-class F1 (test split)", "", "| class | " + " | ".join(reports) + " |"]
        lines.append("| --- |" + " ---: |" * len(reports))
        for i, cls in enumerate(classes):
            lines.append(f"| {cls} | " + " | ".join(f"{r['per_class'][i]['f1']:.4f}" for r in reports.values()) + " |")
    lines += ["", "## Commands", "", "Each run, exactly as it was started:", "", "```bash"]
    lines += [shlex.join(run["command"]) for run in runs.values()]
    lines += ["```", "", "Run dirs (metrics.json, report.md, curves.png, checkpoints):", ""]
    lines += [f"- {name}: `{run['run_dir']}`" for name, run in runs.items()]
    return "\n".join([*lines, ""])


def readme_table(runs: dict[str, dict[str, Any]], when: str, page: Path) -> str:
    """The README's short results table: one row per run, the full page linked."""
    lines = [
        f"Measured by `make reproduce` on {when} ([full results]({page.as_posix()})):",
        "",
        "| run | what | test accuracy | macro-F1 | epochs | weights |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for name, run in runs.items():
        cells = [*_headline_cells(name, run), f"`{run['metrics'].get('weights_id', '-')}`"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def fill_readme(readme: Path, table: str) -> bool:
    """Replace what lies between the README's results markers; False (and one line) if it has none."""
    start, end = README_MARKERS
    new = replace_between(readme.read_text() if readme.is_file() else "", start, end, f"\n{table}\n")
    if new is None:
        print(f"reproduce: {readme} has no {start} ... {end} markers; its table is left alone", file=sys.stderr)
        return False
    atomic_write_text(readme, new)
    return True


def reproduce(
    overrides: Sequence[str] = (),
    output: Path = DEFAULT_OUTPUT,
    only: Sequence[str] | None = None,
    runs_dir: Path | None = None,
    command: str = "make reproduce",
    readme: Path | None = DEFAULT_README,
) -> dict[str, dict[str, Any]]:
    """Run the experiments (all, or `only` these names) and write `output`; returns what each run wrote.

    `command`: how this was started, for the page's first line. `readme`: the README whose results
    table is refreshed too (None: leave it).
    """
    experiments = [e for e in EXPERIMENTS if not only or e.name in only]
    unknown = sorted(set(only or ()) - {e.name for e in EXPERIMENTS})
    if unknown:
        raise FmnistError(
            f"--only {','.join(unknown)}: no such run; choose from {', '.join(e.name for e in EXPERIMENTS)}"
        )
    configs = preflight(experiments, overrides)
    now = dt.datetime.now(dt.UTC)
    if runs_dir is None:
        runs_dir = Path(configs[experiments[0].name].paths.log_dir) / "reproduce" / now.strftime("%Y-%m-%d_%H-%M-%S")
    runs: dict[str, dict[str, Any]] = {}
    for experiment in experiments:
        run_dir = runs_dir / experiment.name
        job = train_command(experiment, run_dir, overrides)
        print(f"reproduce: {experiment.name}: {shlex.join(job)}", file=sys.stderr, flush=True)
        runs[experiment.name] = {
            **run_job(job, run_dir),
            "what": experiment.what,
            "command": job,
            "run_dir": str(run_dir),
        }
    when = now.strftime("%Y-%m-%d %H:%M UTC")
    atomic_write_text(output, results_markdown(runs, command, when, machine()))
    print(f"reproduce: wrote {output}", file=sys.stderr)
    if readme is not None and fill_readme(readme, readme_table(runs, when, output)):
        print(f"reproduce: updated the results table in {readme}", file=sys.stderr)
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_tl.reproduce",
        description="Run the notebook, fine-tune and default experiments; write their results page.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer=gpu")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the results page (docs/results.md)")
    parser.add_argument("--only", help="comma-separated runs: " + ",".join(e.name for e in EXPERIMENTS))
    parser.add_argument("--readme", type=Path, default=DEFAULT_README, help="README whose results table to fill")
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")
    parser.add_argument("--runs-dir", type=Path, help="where the run dirs go (default: logs/reproduce/<time>)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "fmnist_tl.reproduce", *argv])
    with task_wrapper():
        reproduce(
            args.overrides,
            args.output,
            args.only.split(",") if args.only else None,
            args.runs_dir,
            command,
            None if args.no_readme else args.readme,
        )


if __name__ == "__main__":
    main()
