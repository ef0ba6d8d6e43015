"""`python -m fmnist_tl.reproduce`: three training runs, then docs/results.md written from what they wrote."""

from __future__ import annotations

import json
import re

import pytest

from fmnist_tl.reproduce import EXPERIMENTS
from tests.helpers import run_cli, tiny_overrides, unreachable_network_env


def _row(page: str, name: str) -> list[str]:
    (line,) = [line for line in page.splitlines() if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow
def test_reproduce_writes_results_from_the_runs_it_made(tiny_mirror, tmp_path):
    output = tmp_path / "results.md"
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- results:start -->\nnot measured yet\n<!-- results:end -->\n\n## Next\n")
    # Offline whatever this machine's network: random init, and a hub nobody can reach.
    # 4 epochs: experiment=finetune trains the head 3 epochs, then layer4 in the 4th.
    overrides = [*tiny_overrides(tiny_mirror, tmp_path), "trainer.max_epochs=4", "report.plots=false"]
    proc = run_cli(
        "--output",
        str(output),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--readme",
        str(readme),
        *overrides,
        module="fmnist_tl.reproduce",
        env=unreachable_network_env(tmp_path),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = output.read_text()
    # The page names the command that wrote it, not the last training job's.
    assert page.startswith(f"# Results\n\nWritten by `python -m fmnist_tl.reproduce --output {output} ")
    assert "Random-init backbone" in page  # never passed off as ImageNet results
    per_class = page.split("## Per-class F1")[1].split("## Commands")[0]
    for experiment in EXPERIMENTS:
        run_dir = tmp_path / "runs" / experiment.name
        metrics = json.loads((run_dir / "metrics.json").read_text())
        report = json.loads((run_dir / "report.json").read_text())
        # The README's table holds the same figures, between its markers.
        readme_row = _row(readme.read_text(), experiment.name)
        assert readme_row[2] == f"{100 * metrics['test/acc']:.2f}%" and readme_row[3] == f"{metrics['test/f1']:.4f}"
        row = _row(page, experiment.name)
        assert row[2] == f"{100 * metrics['test/acc']:.2f}%"
        assert row[3] == f"{metrics['test/f1']:.4f}"
        assert row[4] == str(metrics["epochs"])
        assert row[7] == f"`{metrics['weights_id']}`"
        # The exact command of each run, which is what made its run dir.
        assert f"hydra.run.dir={run_dir}" in page and " ".join(experiment.overrides) in page
        column = list(EXPERIMENTS).index(experiment) + 1
        for cls in report["per_class"]:
            assert _row(per_class, cls["class"])[column] == f"{cls['f1']:.4f}"
    finetune = json.loads((tmp_path / "runs" / "finetune" / "metrics.json").read_text())
    assert finetune["feature_cache"] == "off"  # the fine-tune run trained its backbone
    assert re.search(r"Machine: CPU .+; GPU ", page)
    text = readme.read_text()
    assert "not measured yet" not in text and text.startswith("# Title\n") and text.endswith("\n## Next\n")


@pytest.mark.slow
def test_reproduce_offline_with_imagenet_weights_stops_at_once(tmp_path):
    output = tmp_path / "results.md"
    proc = run_cli(
        "--output",
        str(output),
        "--readme",
        str(tmp_path / "README.md"),
        f"paths.root_dir={tmp_path}",
        module="fmnist_tl.reproduce",
        env=unreachable_network_env(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot get resnet50 IMAGENET1K_V1 weights") and "model.weights=null" in last
    # Before any run: no run dir, no page, no README.
    assert not output.exists() and not (tmp_path / "logs").exists() and not (tmp_path / "README.md").exists()


@pytest.mark.slow
def test_reproduce_rejects_a_bad_override_before_any_run(tmp_path):
    proc = run_cli(
        "--no-readme",
        f"paths.root_dir={tmp_path}",
        "model.optimizer.lr=-1",
        "model.weights=null",
        module="fmnist_tl.reproduce",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: model.optimizer.lr=-1 must be a positive finite number"
    assert not (tmp_path / "logs").exists()
