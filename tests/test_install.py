"""A wheel built from this checkout runs from any directory: the configs ship inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

# What the wheel is built from (pyproject.toml's packages and package-dir).
SOURCES = ("pyproject.toml", "README.md", "fmnist_tl", "conf", "hydra_plugins")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, site dir): `pip wheel --no-deps` of a copy of the checkout, `pip install --no-deps --target`."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = copy_sources(tmp / "src")  # a copy, so the build leaves no build/ or egg-info in the checkout
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # No build isolation: setuptools comes from the dev extra, so the test needs no index.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp)], check=True)
    (wheel,) = tmp.glob("fmnist_tl-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    return wheel, site


def copy_sources(dest: Path) -> Path:
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / name)
    return dest


def run_from_elsewhere(site: Path | str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python *args` from a directory outside the checkout, with `site` first on the path."""
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_holds_every_config(installed_wheel):
    wheel, _ = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"fmnist_tl/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert len(configs) > 20 and configs <= names


@pytest.mark.slow
def test_wheel_install_runs_the_clis_from_any_directory(installed_wheel, tmp_path):
    _, site = installed_wheel
    elsewhere = tmp_path / "elsewhere"
    show = "from importlib.util import find_spec as f; print(f('fmnist_tl.conf').origin, f('fmnist_tl.train').origin)"
    where = run_from_elsewhere(site, elsewhere, "-c", show)
    assert where.returncode == 0, where.stderr[-2000:]
    assert [Path(p).parent for p in where.stdout.split()] == [site / "fmnist_tl" / "conf", site / "fmnist_tl"]

    train = run_from_elsewhere(site, elsewhere, "-m", "fmnist_tl.train", "--cfg", "job", "model=resnet18")
    assert train.returncode == 0, train.stderr[-2000:]
    assert "task_name: train" in train.stdout and "backbone: resnet18" in train.stdout
    assert "_target_: torch.optim.lr_scheduler.CosineAnnealingLR" in train.stdout  # the nested model/scheduler group
    for module, config in (("fmnist_tl.evaluate", "task_name: evaluate"), ("fmnist_tl.export", "task_name: export")):
        proc = run_from_elsewhere(site, elsewhere, "-m", module, "--cfg", "job")
        assert proc.returncode == 0 and config in proc.stdout, proc.stderr[-2000:]
    assert not list(elsewhere.iterdir())  # --cfg composes only: no run directory, nothing written


@pytest.mark.slow
def test_uninstalled_source_tree_reads_its_own_conf(tmp_path):
    """A clone run from its root without an install mapping conf/ (python -S: no .pth, no editable finder)."""
    clone = copy_sources(tmp_path / "clone")
    deps = os.pathsep.join(sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}))
    show = "import fmnist_tl.config.compose as c; print(c.__file__); print(c.CONFIG_PATH)"
    where = run_from_elsewhere(deps, clone, "-S", "-c", show)
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.split() == [str(clone / "fmnist_tl" / "config" / "compose.py"), str(clone / "conf")]
    train = run_from_elsewhere(deps, clone, "-S", "-m", "fmnist_tl.train", "--cfg", "job", "model=resnet18")
    assert train.returncode == 0 and "backbone: resnet18" in train.stdout, train.stderr[-2000:]


@pytest.mark.slow
def test_wheel_install_summarizes_the_newest_sweep_without_an_argument(installed_wheel, tmp_path):
    """`python -m fmnist_tl.summarize` reads paths.log_dir from the packaged configs (no conf/ beside the
    package), and finds an Optuna study under <log_dir>/<task>/studies/."""
    _, site = installed_wheel
    elsewhere = tmp_path / "elsewhere"
    job = elsewhere / "logs" / "train" / "studies" / "head_optuna" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- model.optimizer.lr=0.001\n")
    (job / "metrics.json").write_text('{"status": "completed", "val/acc": 0.7}')
    proc = run_from_elsewhere(site, elsewhere, "-m", "fmnist_tl.summarize", "--no-plot")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.optimizer.lr" in proc.stdout and (job.parent / "sweep_summary.md").is_file()
