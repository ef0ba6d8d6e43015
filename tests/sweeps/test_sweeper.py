"""The Optuna sweeper (fmnist_tl/sweeps/sweeper.py, search_space.py, study.py; hydra_plugins/fmnist_tl_sweeper): search
spaces, trial outcomes, persistent studies, several workers on one study, lost trials.

Fast tests drive the sweeper as Hydra builds it from conf/hparams_search/head_optuna.yaml, with a
fake launcher. The multi-process ones run tests/sweeps/sweep_app.py, a Hydra app on the same sweeper,
launcher, job dirs and summary whose trials cost milliseconds instead of a training run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState

from fmnist_tl.core.errors import FmnistError
from fmnist_tl.runtime.build import build
from fmnist_tl.sweeps.pruning import PRUNED_AT, TrialPruning, build_pruner, pruned_epoch, pruner_config
from fmnist_tl.sweeps.results import SWEEPER_OVERRIDES
from fmnist_tl.sweeps.search_space import search_space
from fmnist_tl.sweeps.study import (
    FAILURE,
    HEARTBEAT,
    WORKER,
    StudyStore,
    counts_toward_total,
    finish_trial,
    mark_lost,
    process_start,
    worker_identity,
)
from fmnist_tl.sweeps.summary import write_summary
from fmnist_tl.sweeps.sweeper import SweepSettings
from tests.helpers import compose_cfg, start_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)

# ---- search spaces ---------------------------------------------------------------------------------


def test_each_search_space_expression_maps_to_its_optuna_distribution():
    params = {
        "lr": "tag(log, interval(1e-4, 1e-2))",
        "dropout": "interval(0.0, 0.6)",
        "epochs": "int(interval(3, 15))",
        "width": "int(tag(log, interval(16, 512)))",
        "hidden": "choice([], [128], [256,128])",
        "opt": "choice(adam, sgd)",
        "every3": "range(1, 10, 3)",  # Hydra's range stops before 10: 1, 4, 7
        "frac": "range(0.1, 0.5, 0.1)",
        "order": "shuffle(range(1, 4))",
        "batch": "choice(32, 64)",
        "pinned": "interval(0.0, 1.0)",
    }
    dists, pinned = search_space(params, ["seed=3", "pinned=0.5", "batch=choice(16, 32)"])
    assert dists == {
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
        "dropout": FloatDistribution(0.0, 0.6),
        "epochs": IntDistribution(3, 15),
        "width": IntDistribution(16, 512, log=True),
        "hidden": CategoricalDistribution(["[]", "[128]", "[256,128]"]),  # as override text, passed on as is
        "opt": CategoricalDistribution(["adam", "sgd"]),
        "every3": IntDistribution(1, 7, step=3),
        "frac": FloatDistribution(0.1, 0.4, step=0.1),
        "order": CategoricalDistribution([1, 2, 3]),  # no shuffling: every worker must see the same choices
        "batch": CategoricalDistribution([16, 32]),  # the command line's expression replaces the config's
    }
    assert pinned == {"seed": "3", "pinned": "0.5"}  # a plain value pins a searched key


@pytest.mark.parametrize(
    "expression, message",
    [
        ("tag(log, interval(0, 1))", "hydra.sweeper.params.x:"),
        ("range(5, 1)", "hydra.sweeper.params.x: range(5, 1) is empty"),
        ("interval(1,", "cannot parse the sweep override 'x=interval(1,'"),
    ],
)
def test_a_bad_search_space_is_a_one_line_error(expression, message):
    with pytest.raises(FmnistError) as info:
        search_space({"x": expression}, [])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ---- the sweeper with a fake launcher --------------------------------------------------------------


class FakeLauncher:
    """Stands in for Hydra's launcher: each job 'returns' the next outcome (a value or an exception)."""

    def __init__(self, outcomes: list) -> None:
        self.outcomes = iter(outcomes)
        self.launched: list[list[str]] = []

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        returns = []
        for overrides in job_overrides:
            self.launched.append(list(overrides))
            outcome = next(self.outcomes)
            failed = isinstance(outcome, BaseException)
            ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED if failed else JobStatus.COMPLETED)
            ret.return_value = outcome
            returns.append(ret)
        return returns


def head_optuna_sweeper(sweep_dir: Path, outcomes: list, *overrides: str):
    """Our conf/hparams_search/head_optuna.yaml sweeper as Hydra instantiates it, with a fake launcher."""
    cfg = compose_cfg("train", ["hparams_search=head_optuna", *overrides], hydra=True)
    with open_dict(cfg):
        cfg.hydra.sweep.dir = str(sweep_dir)
    sweeper = build(cfg.hydra.sweeper)
    sweeper.config = cfg
    sweeper.launcher = FakeLauncher(outcomes)
    return sweeper


def job_params(overrides: list[str]) -> dict[str, str]:
    """A job's overrides without the sweeper's plumbing (how the job reaches its trial)."""
    pairs = dict(o.split("=", 1) for o in overrides)
    return {k: v for k, v in pairs.items() if k.lstrip("+") not in SWEEPER_OVERRIDES}


def test_failed_trials_are_told_fail_and_the_study_goes_on(tmp_path):
    # NaN (a diverged job), an exception the job raised, and None all count as failed trials.
    outcomes = [float("nan"), RuntimeError("boom"), 0.5, None, 0.7, 0.6]
    sweeper = head_optuna_sweeper(tmp_path, outcomes, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2")
    sweeper.sweep([])
    launched = sweeper.launcher.launched
    assert len(launched) == 6
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert results.best_value == 0.7 and results.n_complete == 3 and results.n_failed == 3 and results.n_lost == 0
    study = optuna.load_study(study_name="head_optuna", storage=f"sqlite:///{tmp_path}/head_optuna.db")
    states = [t.state for t in study.trials]
    assert (
        states == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 2
    )
    failures = [t.user_attrs.get(FAILURE, "") for t in study.trials]
    assert "returned nan" in failures[0] and failures[1] == "RuntimeError: boom" and "None" in failures[3]
    for number, job in enumerate(launched):
        params = job_params(job)
        assert params.pop("hydra.sweep.subdir") == str(number)  # each trial's job dir is its trial number
        assert 1e-4 <= float(params["model.optimizer.lr"]) <= 1e-2
        assert 1e-6 <= float(params["model.optimizer.weight_decay"]) <= 1e-2
        assert params["model.head.hidden_dims"] in ("[]", "[128]", "[256]", "[512]", "[256,128]")
        assert 0.0 <= float(params["model.head.dropout"]) <= 0.6
        assert "trainer.max_epochs" not in params  # fixed at 15: the pruner stops trials early instead
    best = job_params(launched[4])  # the trial that returned 0.7
    best.pop("hydra.sweep.subdir")
    assert {k: str(v) for k, v in results.best_params.items()} == best

    # The sampler is seeded from cfg.seed: the same seed asks the same trials, another seed others.
    again = head_optuna_sweeper(
        tmp_path / "again", list(outcomes), "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2"
    )
    again.sweep([])
    assert [job_params(j) for j in again.launcher.launched] == [job_params(j) for j in launched]
    other = head_optuna_sweeper(tmp_path / "other", [0.5] * 2, "hydra.sweeper.n_trials=2", "seed=7")
    other.sweep([])
    assert [job_params(j) for j in other.launcher.launched] != [job_params(j) for j in launched[:2]]


def test_a_study_where_every_trial_failed_ends_normally(tmp_path):
    sweeper = head_optuna_sweeper(tmp_path, [float("nan"), ValueError("x"), float("inf")], "hydra.sweeper.n_trials=3")
    sweeper.sweep([])  # no exception: the summary callback then shows why each job failed
    assert len(sweeper.launcher.launched) == 3
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert results.n_failed == 3 and "best_value" not in results


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n_trials": 0}, "hydra.sweeper.n_trials=0 must be an integer >= 1"),
        ({"n_jobs": True}, "hydra.sweeper.n_jobs=True must be an integer >= 1"),
        ({"max_failure_rate": 1.5}, "hydra.sweeper.max_failure_rate=1.5 must be in [0, 1]"),
        ({"max_failure_rate": "half"}, "hydra.sweeper.max_failure_rate='half' must be in [0, 1]"),
        ({"heartbeat_interval": 60}, "hydra.sweeper.heartbeat_interval=60 must be positive and below"),
    ],
)
def test_bad_sweeper_settings_are_one_line_errors(bad, message):
    settings = {
        "sampler": None,
        "direction": None,
        "study_name": None,
        "storage": None,
        "n_trials": 4,
        "n_jobs": 1,
        "max_failure_rate": 0.5,
        "params": None,
        "heartbeat_interval": 30,
        "grace_period": 60,
    }
    SweepSettings(**settings).check()
    with pytest.raises(FmnistError, match=re.escape(message)):
        SweepSettings(**{**settings, **bad}).check()


def test_a_worker_stops_early_only_past_max_failure_rate(tmp_path):
    sweeper = head_optuna_sweeper(
        tmp_path,
        [0.5, float("nan"), float("nan"), 0.6],
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=0.5",
    )
    sweeper.sweep([])
    assert len(sweeper.launcher.launched) == 3  # 2 of 3 failed > 0.5: stop, keep the results so far
    assert OmegaConf.load(tmp_path / "optimization_results.yaml").best_value == 0.5


def test_the_study_persists_and_n_trials_is_its_total(tmp_path):
    first = head_optuna_sweeper(tmp_path, [0.1, 0.2, 0.3], "hydra.sweeper.n_trials=3")
    first.sweep([])
    second = head_optuna_sweeper(tmp_path, [0.4, 0.5], "hydra.sweeper.n_trials=5")
    second.sweep([])
    assert [job_params(j)["hydra.sweep.subdir"] for j in second.launcher.launched] == ["3", "4"]
    third = head_optuna_sweeper(tmp_path, [], "hydra.sweeper.n_trials=5")
    third.sweep([])  # nothing missing: nothing launched
    assert third.launcher.launched == []
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert results.n_trials == 5 and results.best_value == 0.5 and results.best_trial == 4
    assert results.storage == f"sqlite:///{tmp_path}/head_optuna.db"


def test_a_study_reused_with_another_search_space_or_direction_is_refused(tmp_path, capsys):
    head_optuna_sweeper(tmp_path, [0.1], "hydra.sweeper.n_trials=1").sweep([])
    changed = head_optuna_sweeper(tmp_path, [0.2], "hydra.sweeper.n_trials=2")
    with pytest.raises(SystemExit) as info:
        changed.sweep(["model.head.hidden_dims=choice([64],[32])"])
    assert info.value.code == 2 and changed.launcher.launched == []
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: study head_optuna in sqlite:") and "model.head.hidden_dims" in line
    flipped = head_optuna_sweeper(tmp_path, [0.2], "hydra.sweeper.n_trials=2", "objective.mode=min")
    with pytest.raises(SystemExit):
        flipped.sweep([])
    assert "maximize, not minimize" in capsys.readouterr().err
    # A fresh in-memory study in a sweep dir that holds another study's job dirs would mix them.
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    fresh = head_optuna_sweeper(tmp_path, [0.2], "hydra.sweeper.storage=memory")
    with pytest.raises(SystemExit):
        fresh.sweep([])
    assert "holds job dirs of another study" in capsys.readouterr().err and fresh.launcher.launched == []


def test_one_objective_override_sets_checkpoint_early_stopping_sweeper_and_summary(tmp_path):
    losses = [0.3, 0.1, 0.2]
    sweeper = head_optuna_sweeper(
        tmp_path, list(losses), "objective.metric=val/loss", "objective.mode=min", "hydra.sweeper.n_trials=3"
    )
    cfg = sweeper.config
    # dirpath given: its default, ${paths.output_dir}, resolves only in a Hydra run.
    checkpoint = build(cfg.callbacks.model_checkpoint, dirpath=str(tmp_path / "run"))
    stopping = build(cfg.callbacks.early_stopping)
    assert (checkpoint.monitor, checkpoint.mode) == (stopping.monitor, stopping.mode) == ("val/loss", "min")
    sweeper.sweep([])
    study = optuna.load_study(study_name="head_optuna", storage=f"sqlite:///{tmp_path}/head_optuna.db")
    assert study.direction == StudyDirection.MINIMIZE and study.best_trial.number == 1
    # Each job dir as Hydra and train leave it: the summary ranks by the saved config's objective.
    app_cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    del app_cfg["hydra"]
    for n, loss in enumerate(losses):
        hydra_dir = tmp_path / str(n) / ".hydra"
        hydra_dir.mkdir(parents=True)
        OmegaConf.save(app_cfg, hydra_dir / "config.yaml")
        (hydra_dir / "overrides.yaml").write_text(f"- seed={n}\n")
        (tmp_path / str(n) / "metrics.json").write_text(json.dumps({"val/loss": loss, "val/acc": 1 - loss}))
    summary = write_summary(tmp_path, plot=False)
    assert (summary.objective, summary.maximize) == ("val/loss", False)
    assert [j.name for j in summary.jobs] == ["1", "2", "0"] and summary.best.name == "1"


def test_an_explicit_direction_must_agree_with_the_objective(tmp_path, capsys):
    agreed = head_optuna_sweeper(tmp_path / "a", [0.5], "hydra.sweeper.n_trials=1", "hydra.sweeper.direction=maximize")
    agreed.sweep([])
    assert len(agreed.launcher.launched) == 1
    against = head_optuna_sweeper(tmp_path / "b", [0.5], "hydra.sweeper.direction=minimize")
    with pytest.raises(SystemExit) as info:
        against.sweep([])
    assert info.value.code == 2 and against.launcher.launched == []
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: hydra.sweeper.direction=minimize contradicts objective.mode=max")
    # An app without an objective (any other Hydra app): the direction as given, else Optuna's minimize.
    settings = against.settings
    assert settings.one_direction(None) == "minimize"
    settings.direction = None
    assert settings.one_direction(None) == "minimize" and settings.one_direction("max") == "maximize"


def test_grid_sampler_runs_each_grid_point_once(tmp_path, caplog):
    # head_optuna's TPE setting (n_startup_trials) is left out for the grid sampler, with a warning.
    sweeper = head_optuna_sweeper(
        tmp_path, [0.5] * 6, "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=50", "hydra.sweeper.params=null"
    )
    sweeper.sweep(["model.head.hidden_dims=choice([64],[32])", "trainer.max_epochs=range(1,4)"])
    launched = [job_params(j) for j in sweeper.launcher.launched]
    points = {(p["model.head.hidden_dims"], p["trainer.max_epochs"]) for p in launched}
    assert len(launched) == 6 and points == {(h, e) for h in ("[64]", "[32]") for e in ("1", "2", "3")}
    assert "GridSampler takes no hydra.sweeper.sampler.n_startup_trials: left out" in caplog.text


# ---- pruning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("hydra.sweeper.pruner._target_=optuna.pruners.NoSuchPruner",
         "hydra.sweeper.pruner._target_=optuna.pruners.NoSuchPruner is not a class"),
        ("+hydra.sweeper.pruner.patience=3", "hydra.sweeper.pruner: SuccessiveHalvingPruner takes no patience"),
        ("hydra.sweeper.pruner.reduction_factor=1",
         "hydra.sweeper.pruner: cannot build optuna.pruners.SuccessiveHalvingPruner"),
        ("hydra.sweeper.pruner._target_=optuna.samplers.RandomSampler",
         "hydra.sweeper.pruner._target_=optuna.samplers.RandomSampler is not an Optuna pruner"),
        ("~hydra.sweeper.pruner._target_", "hydra.sweeper.pruner needs a _target_"),
    ],
)  # fmt: skip
def test_a_bad_pruner_is_a_one_line_error(tmp_path, capsys, override, message):
    sweeper = head_optuna_sweeper(tmp_path, [0.5], override)
    with pytest.raises(SystemExit) as info:
        sweeper.sweep([])
    assert info.value.code == 2 and sweeper.launcher.launched == []
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_head_optuna_prunes_by_default_over_a_fixed_epoch_count_and_each_pruner_is_a_choice():
    cfg = compose_cfg("train", ["hparams_search=head_optuna"], hydra=True)
    assert cfg.trainer.max_epochs == 15 and "trainer.max_epochs" not in cfg.hydra.sweeper.params
    # The measured choice (bench/results/*-pruning.json, docs/sweeps.md): successive halving from epoch 2.
    assert OmegaConf.to_container(cfg.hydra.sweeper.pruner) == {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner",
        "min_resource": 2,
        "reduction_factor": 3,
    }
    for name in ("none", "median", "percentile", "successive_halving", "hyperband"):
        cfg = compose_cfg("train", ["hparams_search=head_optuna", f"hydra/sweeper/pruner={name}"], hydra=True)
        assert isinstance(build_pruner(pruner_config(cfg.hydra.sweeper.pruner)), optuna.pruners.BasePruner)
    off = compose_cfg("train", ["hparams_search=head_optuna", "hydra.sweeper.pruner=null"], hydra=True)
    assert isinstance(build_pruner(pruner_config(off.hydra.sweeper.pruner)), optuna.pruners.NopPruner)


def test_each_trial_gets_its_pruning_callback_and_no_on_exception_checkpoint(tmp_path):
    sweeper = head_optuna_sweeper(tmp_path, [0.5, 0.6], "hydra.sweeper.n_trials=2")
    sweeper.sweep([])
    for number, job in enumerate(sweeper.launcher.launched):
        # The job as Hydra composes it: its callbacks have the trial's TrialPruning and no OnExceptionCheckpoint.
        cfg = compose_cfg("train", ["hparams_search=head_optuna", *job[:-1]], hydra=True)
        HydraConfig().set_config(cfg)  # for ${hydra:sweeper.pruner}, as in a launched job
        assert cfg.callbacks.on_exception_checkpoint is None and cfg.callbacks.model_checkpoint is not None
        pruning = build(cfg.callbacks.optuna_trial)
        assert (pruning.storage_spec, pruning.study_name) == (f"sqlite:///{tmp_path}/head_optuna.db", "head_optuna")
        assert pruning.trial_number == number and pruning.monitor == "val/acc"
        assert isinstance(pruning.pruner, optuna.pruners.SuccessiveHalvingPruner)
    # The summary shows what each trial tried, not the sweeper's plumbing.
    for number in (0, 1):
        job_dir = tmp_path / str(number) / ".hydra"
        job_dir.mkdir(parents=True)
        (job_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(sweeper.launcher.launched[number][:-1]))
    summary = write_summary(tmp_path, plot=False)
    assert summary.swept == ["model.head.dropout", "model.head.hidden_dims", "model.optimizer.lr",
                             "model.optimizer.weight_decay"] and summary.common == {}  # fmt: skip


def test_a_memory_study_with_a_launcher_of_other_processes_is_refused(tmp_path, capsys):
    sweeper = head_optuna_sweeper(tmp_path, [0.5], "hydra.sweeper.storage=memory", "hydra/launcher=joblib")
    with pytest.raises(SystemExit) as info:
        sweeper.sweep([])
    assert info.value.code == 2 and sweeper.launcher.launched == []
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: hydra.sweeper.storage=memory") and "hydra/launcher=joblib" in line
    assert "hydra.sweeper.storage=null" in line


def test_a_pruned_trial_reports_its_best_so_far_and_stops_every_rank_together(tmp_path):
    """TrialPruning against a SQLite study, as a job runs it: the value reported at epoch k is the
    best so far (what the trial would return), the last epoch is never pruned, and rank 0's
    decision is what every rank follows."""
    store = StudyStore(None, tmp_path, "s")
    study = optuna.create_study(study_name="s", storage=store.storage, direction="maximize")
    threshold = {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5}
    trial = study.ask()
    cb = TrialPruning(store.job_spec(), "s", trial.number, "val/acc", OmegaConf.create(threshold))
    assert not cb.step(1, 0.7) and not cb.step(2, 0.4)  # best so far 0.7: above the threshold
    assert cb.step(3, 0.45, last=True) is False  # the last epoch is reported, never pruned
    assert study.trials[0].intermediate_values == {1: 0.7, 2: 0.7, 3: 0.7}

    class Strategy:
        def __init__(self, rank0_says: bool | None) -> None:
            self.rank0_says = rank0_says

        def broadcast(self, obj, src=0):  # what DDP's broadcast does: every rank gets rank 0's object
            return obj if self.rank0_says is None else self.rank0_says

    trial = study.ask()
    for rank, rank0_says in ((0, None), (1, True)):
        cb = TrialPruning(store.job_spec(), "s", trial.number, "val/acc", OmegaConf.create(threshold))
        trainer = SimpleNamespace(sanity_checking=False, fast_dev_run=False, current_epoch=0, max_epochs=15,
                                  is_global_zero=rank == 0, callback_metrics={"val/acc": torch.tensor(0.2)},
                                  strategy=Strategy(rank0_says), should_stop=False)  # fmt: skip
        cb.on_validation_end(trainer, None)
        assert trainer.should_stop and cb.pruned_at == 1 and pruned_epoch(trainer) == 1
    assert study.trials[1].user_attrs[PRUNED_AT] == 1 and study.trials[1].intermediate_values == {1: pytest.approx(0.2)}
    finish_trial(study, study.trials[1].number, pruned=True)
    assert study.trials[1].state == TrialState.PRUNED and study.trials[1].value == pytest.approx(0.2)  # its last value


# ---- lost trials -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_only_trials_of_gone_workers_are_marked_lost(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="s")
    here = worker_identity()
    sleeper = subprocess.Popen(["sleep", "60"])
    dead = {**here, "pid": sleeper.pid, "started": process_start(sleeper.pid)}
    sleeper.kill()
    sleeper.wait()
    elsewhere = {**here, "host": socket.gethostname() + "-other", "pid": 1}
    now = time.time()
    workers = [
        (here, now - 10_000),  # this live process: never lost, however old its heartbeat
        (dead, now),  # same machine, process gone: lost at once, however fresh its heartbeat
        ({**here, "started": here["started"] - 1}, now),  # same pid, another process (pid reused): lost
        (elsewhere, now - 60),  # another machine, heartbeat within the grace period: alive
        (elsewhere, now - 700),  # another machine, silent for longer than grace_period: lost
    ]
    for worker, beat in workers:
        trial = study.ask()
        trial.set_user_attr(WORKER, worker)
        trial.set_user_attr(HEARTBEAT, beat)
    study.ask()  # no worker attr (not asked by this sweeper): left alone
    (tmp_path / "1" / ".hydra").mkdir(parents=True)  # trial 1's job dir, without metrics.json

    assert mark_lost(study, here, 600.0, tmp_path) == 3
    states = [t.state for t in study.trials]
    running, fail = TrialState.RUNNING, TrialState.FAIL
    assert states == [running, fail, fail, running, fail, running]
    assert not any(counts_toward_total(t) for t in study.trials if t.state == fail)  # a lost trial is replaced
    metrics = json.loads((tmp_path / "1" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and f"pid {sleeper.pid}" in metrics["error"]


# ---- several processes on one study ------------------------------------------------------------------


def run_app(sweep: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = ("-m", f"hydra.sweep.dir={sweep}", *args)
    return start_cli(*cmd, module="tests.sweeps.sweep_app", stdout=subprocess.DEVNULL, env=env)


def finish(proc: subprocess.Popen, timeout: int = 180) -> int:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return proc.returncode


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def job_dirs(sweep: Path) -> list[str]:
    return sorted((d.name for d in sweep.iterdir() if (d / ".hydra").is_dir()), key=int)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL cluster in a temp dir on a Unix socket; yields a function making a database.

    Debian's postgresql (CI installs it in .ci/run). initdb refuses to run as root, so as root the
    cluster belongs to the package's `postgres` user.
    """
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    initdb = shutil.which("initdb") or (str(bindirs[-1] / "initdb") if bindirs else None)
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; CI does)")
    bindir = Path(initdb).resolve().parent
    root = Path(tempfile.mkdtemp(prefix="fmnist-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        root.chmod(0o755)
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, sock = root / "data", root / "sock"
    run = [*as_user]

    def pg(*args: str) -> None:
        subprocess.run([*run, *args], check=True, capture_output=True, timeout=120)

    pg("mkdir", str(sock))
    pg(str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres")
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "start",
       "-o", f"-k {sock} -c listen_addresses=''")  # fmt: skip
    names = iter(range(1000))

    def new_database() -> str:
        name = f"study{next(names)}"
        pg(str(bindir / "createdb"), "-h", str(sock), "-U", "postgres", name)
        return f"postgresql+psycopg://postgres@/{name}?host={sock}"

    try:
        yield new_database
    finally:
        subprocess.run([*run, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_two_workers_share_one_study_and_stop_at_its_total(tmp_path, kind, request):
    sweep = tmp_path / "sweep"
    storage = {
        "sqlite": (None, f"sqlite:///{sweep}/toy.db"),  # the default: a SQLite file in the sweep dir
        "journal": (f"journal:{tmp_path}/shared/toy.log", None),
        "postgresql": (None, None),
    }[kind]
    setting, url = storage
    if kind == "postgresql":
        url = request.getfixturevalue("postgres")()
        setting = url
    args = ["rendezvous=2", "hydra.sweeper.n_trials=6"]  # each worker's first trial waits for the other's
    if setting:
        args.append(f"hydra.sweeper.storage='{setting}'")
    workers = [run_app(sweep, *args) for _ in range(2)]
    for w in workers:
        finish(w)

    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        url = JournalStorage(JournalFileBackend(f"{tmp_path}/shared/toy.log"))
    study = optuna.load_study(study_name="toy", storage=url)
    assert len(study.trials) == 6 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert study.direction == StudyDirection.MAXIMIZE  # from the app's objective.mode
    assert job_dirs(sweep) == [str(n) for n in range(6)]
    pids = {json.loads((sweep / str(n) / "metrics.json").read_text())["pid"] for n in range(6)}
    assert pids == {w.pid for w in workers}  # both took part
    rows = read_csv(sweep / "sweep_summary.csv")  # one summary of the whole study
    assert sorted(r["job"] for r in rows) == [str(n) for n in range(6)] and {r["status"] for r in rows} == {"completed"}
    assert OmegaConf.load(sweep / "optimization_results.yaml").n_complete == 6


@pytest.mark.slow
def test_a_rerun_after_a_kill_or_ctrl_c_runs_only_the_missing_trials(tmp_path):
    sweep = tmp_path / "sweep"

    def run_until_hanging(trial: int, sig: int) -> int:
        proc = run_app(sweep, env={"SWEEP_APP_HANG_AT": str(trial)})
        deadline = time.time() + 120
        while not (sweep / str(trial) / "hanging").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        return proc.returncode

    assert run_until_hanging(2, signal.SIGKILL) == -signal.SIGKILL  # trials 0, 1 done; 2 left RUNNING
    assert run_until_hanging(4, signal.SIGINT) != 0  # 2 found lost; 3 done; Ctrl-C in 4
    done_before = {n: (sweep / str(n) / "metrics.json").stat().st_mtime_ns for n in (0, 1, 3)}
    finish(run_app(sweep))  # the same command once more

    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{sweep}/toy.db")
    complete = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    lost = [t.number for t in study.trials if t.state == TrialState.FAIL]
    assert complete == [0, 1, 3, 5, 6, 7] and lost == [2, 4]  # 6 done in all: only 3 more were run
    assert {n: (sweep / str(n) / "metrics.json").stat().st_mtime_ns for n in (0, 1, 3)} == done_before
    rows = {r["job"]: r for r in read_csv(sweep / "sweep_summary.csv")}
    assert sorted(rows, key=int) == [str(n) for n in range(8)]
    assert rows["2"]["status"] == "interrupted" and "is gone" in rows["2"]["error"]
    assert rows["4"]["status"] == "interrupted" and "KeyboardInterrupt" in rows["4"]["error"]


@pytest.mark.slow
def test_nan_and_raising_trials_fail_in_a_real_sweep_and_the_study_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    finish(run_app(sweep, "hydra/sweeper/sampler=grid", "x=0.5", "outcome=choice(ok,diverge,crash)", "y=choice(1,2)"))
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{sweep}/toy.db")
    by_outcome = {(t.params["outcome"], t.params["y"]): t for t in study.trials}
    assert len(study.trials) == 6 and len(by_outcome) == 6
    for (outcome, _), trial in by_outcome.items():
        assert trial.state == (TrialState.COMPLETE if outcome == "ok" else TrialState.FAIL)
    assert all("returned nan" in by_outcome[("diverge", y)].user_attrs[FAILURE] for y in (1, 2))
    assert all(by_outcome[("crash", y)].user_attrs[FAILURE] == "RuntimeError: this trial raised" for y in (1, 2))


# ---- pruning in real sweeps of the toy app -----------------------------------------------------------

# Prunes every trial whose value after the first of 3 epochs (half its final value) is below 0.45.
THRESHOLD = (
    "epochs=3",
    "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
    "+hydra.sweeper.pruner.lower=0.45",
)


def toy_value(params: dict) -> float:
    return 1.0 - (params["x"] - 0.3) ** 2 - 0.01 * params["y"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_prune_trials_of_one_study(tmp_path, kind):
    sweep = tmp_path / "sweep"
    log = tmp_path / "shared" / "toy.log"
    args = ["rendezvous=2", "hydra.sweeper.n_trials=6", *THRESHOLD]
    if kind == "journal":
        args.append(f"hydra.sweeper.storage='journal:{log}'")
    workers = [run_app(sweep, *args) for _ in range(2)]
    for w in workers:
        finish(w)
    finish(run_app(sweep, *args))  # a rerun: pruned trials count toward n_trials and are not run again

    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(str(log)))
    else:
        storage = f"sqlite:///{sweep}/toy.db"
    study = optuna.load_study(study_name="toy", storage=storage)
    assert len(study.trials) == 6
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, "no trial was pruned"  # 6 random trials all above 0.9: (x-0.3)^2 + 0.01y < 0.1 each
    for t in study.trials:
        metrics = json.loads((sweep / str(t.number) / "metrics.json").read_text())
        if toy_value(t.params) / 2 < 0.45:
            assert t.state == TrialState.PRUNED and t.value == pytest.approx(toy_value(t.params) / 2)
            assert metrics["status"] == "pruned" and metrics["pruned_at_epoch"] == 1 == metrics["epochs"]
        else:
            assert t.state == TrialState.COMPLETE and metrics["status"] == "completed" and metrics["epochs"] == 3
    pids = {json.loads((sweep / str(n) / "metrics.json").read_text())["pid"] for n in range(6)}
    assert pids == {w.pid for w in workers}  # both workers ran (and pruned) trials
    rows = read_csv(sweep / "sweep_summary.csv")
    assert sorted(r["job"] for r in rows) == [str(n) for n in range(6)]
    assert sum(r["status"] == "pruned" for r in rows) == len(pruned)
    assert all(r["best"] == "" for r in rows if r["status"] == "pruned")
    md = (sweep / "sweep_summary.md").read_text()
    assert f"epochs in jobs: {len(pruned) + 3 * (6 - len(pruned))}" in md and f"{len(pruned)} trials pruned" in md
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.n_pruned == len(pruned) and results.n_complete == 6 - len(pruned)


@pytest.mark.slow
def test_a_memory_study_prunes_in_the_basic_launcher_and_is_refused_with_joblib(tmp_path):
    # The basic launcher runs each job in the sweeper's process: the job reaches the memory study there.
    finish(run_app(tmp_path / "basic", "hydra.sweeper.storage=memory", "hydra.sweeper.n_trials=4", "x=0.95",
                   *THRESHOLD))  # fmt: skip
    statuses = {json.loads(p.read_text())["status"] for p in (tmp_path / "basic").glob("*/metrics.json")}
    assert statuses == {"pruned"}  # x=0.95: 1 - 0.4225 - 0.01y < 0.9 for every y
    proc = run_app(tmp_path / "joblib", "hydra.sweeper.storage=memory", "hydra/launcher=joblib", *THRESHOLD)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: hydra.sweeper.storage=memory") and "hydra.sweeper.storage=null" in line


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_writes_its_results_and_advises_a_rerun(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app(sweep, "hydra.sweeper.n_trials=4", env={"SWEEP_APP_HANG_AT": "2"})
    deadline = time.time() + 120
    while not (sweep / "2" / "hanging").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the sweep stopped (Ctrl-C); trial 2 told FAIL as lost")
    assert "rerun the same sweep command" in last and "ckpt_path" not in err
    results = OmegaConf.load(sweep / "optimization_results.yaml")  # written by the worker as it stopped
    assert results.n_complete == 2 and results.n_lost == 1
    assert (sweep / "sweep_summary.png").is_file() and (sweep / "sweep_summary.csv").is_file()
