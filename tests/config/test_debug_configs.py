"""conf/debug/: where debug runs go, and that they run without Lightning's warnings."""

from __future__ import annotations

import warnings

import pytest
from omegaconf import OmegaConf

from fmnist_tl.train import train
from tests.helpers import REPO, compose_cfg

DEBUG_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "debug").glob("*.yaml"))


def test_debug_runs_go_to_their_own_task_dir_and_log_as_the_configuration_page_says():
    assert DEBUG_OPTIONS == ["fdr", "limit", "overfit"]
    page = (REPO / "docs" / "configuration.md").read_text()
    (row,) = [line for line in page.splitlines() if line.startswith("| `debug` |")]
    assert all(f"`{option}`" in row for option in DEBUG_OPTIONS)
    assert "`logs/debug/runs/`" in row and "`debug.log`" in row
    assert "`logs/debug/runs/<date>_<time>_<microseconds>/`" in page
    for option in DEBUG_OPTIONS:
        cfg = compose_cfg("train", [f"debug={option}"], hydra=True)
        assert cfg.task_name == "debug"
        hydra = OmegaConf.to_container(cfg.hydra, resolve=False)
        assert hydra["run"]["dir"].startswith("${paths.log_dir}/${task_name}/runs/")
        assert hydra["job_logging"]["handlers"]["file"]["filename"].endswith("/${task_name}.log")


@pytest.mark.parametrize("option, batches", [("limit", "limit_train_batches"), ("overfit", "overfit_batches")])
def test_debug_options_log_within_their_few_batches(option, batches):
    trainer = compose_cfg("train", [f"debug={option}"]).trainer
    assert trainer.log_every_n_steps <= trainer[batches]


@pytest.mark.slow
@pytest.mark.parametrize("option", ["limit", "overfit"])
def test_debug_runs_print_no_logging_interval_warning(tiny_cfg, option):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(tiny_cfg(f"debug={option}", "trainer.max_epochs=2"))
    assert metrics["status"] == "completed"
    assert not [str(w.message) for w in caught if "log_every_n_steps" in str(w.message)]
