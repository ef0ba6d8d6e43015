"""Sweeps: failed jobs in multiruns, the sweep summary, and real multiruns of train.

Fast tests build sweep dirs by hand; the slow ones run real multiruns (basic, joblib and submitit
launchers, the Optuna sweeper) on the tiny data. The sweeper's own tests are in test_sweeper.py.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf, read_write

import fmnist_tl.train as train_module
from fmnist_tl import summarize
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.evaluate import evaluate
from fmnist_tl.sweeps.summary import write_summary
from tests.helpers import DDP_SIM, make_entry_cfg, run_cli, tiny_data_overrides, tiny_overrides

# ---- summary of hand-made sweep dirs -----------------------------------------------------------


def fake_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None) -> Path:
    """A job dir as Hydra and train leave it: .hydra/overrides.yaml, and metrics.json once it ended."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def done(val: float, test: float, **extra) -> dict:
    return {"status": "completed", "val/acc": val, "val/f1": val - 0.01, "test/acc": test, "test/f1": test - 0.01,
            "epochs": 3, "wall_time_s": 12.5, "optimized_metric": "val/acc", **extra}  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_summary_ranks_by_val_marks_best_and_lists_failed_and_incomplete_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    common = "model.image_size=32"
    fake_job(sweep, "0", [common, "model.optimizer.lr=0.001", "model.head.dropout=0.2"], done(0.80, 0.95))
    fake_job(sweep, "1", [common, "model.optimizer.lr=0.01", "model.head.dropout=0.2"], done(0.90, 0.70))
    fake_job(sweep, "2", [common, "model.optimizer.lr=1e6", "model.head.dropout=0.5"],
             {"status": "failed", "error": "training diverged: loss is nan", "wall_time_s": 2.0})  # fmt: skip
    fake_job(sweep, "3", [common, "model.optimizer.lr=0.0001", "model.head.dropout=0.5"], None)  # still running
    fake_job(sweep, "10", [common, "model.optimizer.lr=0.003", "model.head.dropout=0.5"], done(0.85, 0.99))

    summarize.main([str(sweep)])  # the CLI, in-process

    rows = read_csv(sweep / "sweep_summary.csv")
    # Ranked on val/acc (test/acc would give another order: never used to rank); job "10" sorts as a number.
    assert [r["job"] for r in rows] == ["1", "10", "0", "2", "3"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r["best"] for r in rows] == ["*", "", "", "", ""]
    assert [r["status"] for r in rows] == ["completed", "completed", "completed", "failed", "incomplete"]
    assert rows[3]["error"] == "training diverged: loss is nan" and rows[3]["val/acc"] == ""
    # Swept keys get their own columns; the shared override is not one of them.
    assert rows[0]["model.optimizer.lr"] == "0.01" and rows[0]["model.head.dropout"] == "0.2"
    assert "model.image_size" not in rows[0]
    assert rows[0]["overrides"] == "model.head.dropout=0.2 model.optimizer.lr=0.01"
    assert float(rows[0]["val/acc"]) == 0.90 and rows[0]["epochs"] == "3" and float(rows[0]["wall_time_s"]) == 12.5

    md = (sweep / "sweep_summary.md").read_text()
    assert md == capsys.readouterr().out
    assert "5 jobs: 3 completed, 1 failed, 1 incomplete" in md
    assert "Common overrides: `model.image_size=32`" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert table[0].startswith("| 1 | **best** | 1 | completed |")
    assert "| 5 |  | 3 | incomplete |" in table[4]
    assert (sweep / "sweep_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![val/acc against each swept parameter](sweep_summary.png)" in md
    assert not list(sweep.glob(".*.tmp"))  # atomic writes leave no temp files


def test_backbone_sweep_shows_each_jobs_extraction_speed(tmp_path):
    sweep = tmp_path / "sweep"

    def cache(train_s: float, status: str = "extracted") -> dict:
        return {"train": {"status": status, "count": 400, "seconds": train_s, "entry": "e"},
                "test": {"status": "hit", "count": 100, "seconds": 0.01, "entry": "t"}}  # fmt: skip

    fake_job(sweep, "0", ["model=resnet50"], done(0.80, 0.8, feature_cache=cache(4.0)))
    fake_job(sweep, "1", ["model=convnext_tiny"], done(0.90, 0.9, feature_cache=cache(8.0)))
    fake_job(sweep, "2", ["model=efficientnet_b0"], done(0.85, 0.85, feature_cache=cache(1.0, "hit")))
    write_summary(sweep, plot=False)
    rows = read_csv(sweep / "sweep_summary.csv")
    assert [r["model"] for r in rows] == ["convnext_tiny", "efficientnet_b0", "resnet50"]
    # Cache hits took no extraction: only the splits a job extracted count.
    assert [r["extraction_img_per_s"] for r in rows] == ["50.0", "", "100.0"]
    md = (sweep / "sweep_summary.md").read_text()
    assert "| epochs | extract img/s | wall s |" in md and "| 3 | 50.0 | 12.5 |" in md


def test_summary_aggregates_repeated_seeds_as_mean_and_std(tmp_path):
    sweep = tmp_path / "sweep"
    vals = {"0.2": [0.70, 0.74, 0.72], "0.5": [0.80, 0.86, 0.83]}
    n = 0
    for dropout, accs in vals.items():
        for seed, acc in enumerate(accs):
            fake_job(sweep, str(n), [f"model.head.dropout={dropout}", f"seed={seed}"], done(acc, acc - 0.05))
            n += 1
    summary = write_summary(sweep, plot=False)
    assert [g.overrides for g in summary.groups] == [{"model.head.dropout": "0.5"}, {"model.head.dropout": "0.2"}]

    rows = read_csv(sweep / "sweep_summary_by_config.csv")
    assert [r["overrides"] for r in rows] == ["model.head.dropout=0.5", "model.head.dropout=0.2"]
    assert [r["best"] for r in rows] == ["*", ""]
    assert rows[0]["seeds"] == "3" and rows[0]["completed"] == "3"
    assert float(rows[0]["val/acc mean"]) == pytest.approx(statistics.fmean(vals["0.5"]))
    assert float(rows[0]["val/acc std"]) == pytest.approx(statistics.stdev(vals["0.5"]))
    assert float(rows[1]["test/acc mean"]) == pytest.approx(statistics.fmean(vals["0.2"]) - 0.05)
    md = (sweep / "sweep_summary.md").read_text()
    assert f"{statistics.fmean(vals['0.5']):.4f} ± {statistics.stdev(vals['0.5']):.4f}" in md
    assert len(read_csv(sweep / "sweep_summary.csv")) == 6  # the per-job table stays one row per job


@pytest.mark.parametrize("mode, order", [("min", ["1", "2", "0"]), ("max", ["0", "2", "1"])])
def test_summary_ranks_by_the_objective_each_job_saved_not_by_the_metric_name(tmp_path, mode, order):
    sweep = tmp_path / "sweep"
    for name, loss in (("0", 0.5), ("1", 0.1), ("2", 0.3)):
        run = fake_job(sweep, name, [f"seed={name}"], {"status": "completed", "val/loss": loss})
        # As Hydra saves the job's config: the objective train ranked its checkpoints by.
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"objective": {"metric": "val/loss", "mode": mode}}))
    summary = write_summary(sweep, plot=False)
    assert summary.objective == "val/loss" and summary.maximize == (mode == "max")
    assert [r["job"] for r in read_csv(sweep / "sweep_summary.csv")] == order
    assert f"Ranked by `val/loss` ({mode}imised)" in (sweep / "sweep_summary.md").read_text()


def test_summarize_cli_rejects_a_dir_that_is_not_a_sweep(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(SystemExit) as exit_info:
            summarize.main([str(target)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(target) in err[0]
        if target.name == "missing":  # named as missing, and not made by the summary's lock file
            assert "is not a directory" in err[0] and not target.exists()


# ---- train's main() in a multirun: any failure is recorded, the sweep goes on --------------------


@pytest.fixture
def multirun_cfg(tiny_cfg):
    cfg = tiny_cfg()
    hydra_cfg = HydraConfig.instance().cfg  # what HydraConfig.get() (train's _is_multirun) reads
    with read_write(hydra_cfg.hydra):
        hydra_cfg.hydra.mode = RunMode.MULTIRUN
        hydra_cfg.hydra.sweep.dir = str(Path(cfg.paths.output_dir).parent)  # the job dir is <sweep>/run
    yield cfg
    with read_write(hydra_cfg.hydra):
        hydra_cfg.hydra.mode = RunMode.RUN


@pytest.mark.parametrize(
    "error, recorded",
    [
        (FmnistError("training diverged: loss is nan at epoch 0, step 3; lower model.optimizer.lr"),
         "training diverged: loss is nan at epoch 0, step 3; lower model.optimizer.lr"),
        (RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"), "RuntimeError: CUDA out of memory."),
    ],
    ids=["user-error", "other-exception"],
)  # fmt: skip
def test_failed_job_in_a_multirun_is_recorded_and_returns_nan(multirun_cfg, monkeypatch, error, recorded):
    def fail(cfg):
        raise error

    monkeypatch.setattr(train_module, "train", fail)
    value = train_module.main(multirun_cfg)  # hydra.main passes a given config straight through
    assert math.isnan(value)
    metrics = json.loads((Path(multirun_cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == recorded
    assert metrics["objective"] == {"metric": "val/acc", "mode": "max"} and metrics["wall_time_s"] >= 0


def sigterm_wrapped() -> FmnistError:
    """SIGTERM mid-fit as train may report it: a FmnistError raised from Lightning's SIGTERMException."""
    try:
        raise SIGTERMException
    except SIGTERMException as e:
        try:
            raise FmnistError("training interrupted (SIGTERMException); checkpoint saved at x.ckpt") from e
        except FmnistError as wrapped:
            return wrapped


def ctrl_c_mid_fit() -> SystemExit:
    """Lightning's sys.exit(1) after it handled a Ctrl-C mid-fit."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        try:
            raise SystemExit(1)
        except SystemExit as e:
            return e


@pytest.mark.parametrize(
    "error, code, recorded",
    [
        (KeyboardInterrupt(), 130, "stopped by Ctrl-C; the sweep stopped here"),
        (ctrl_c_mid_fit(), 130, "stopped by Ctrl-C; the sweep stopped here"),  # Lightning's exit after Ctrl-C
        # A trial is never resumed: no checkpoint advice, whatever the error wrapping the signal says.
        (sigterm_wrapped(), 143, "stopped by SIGTERM; the sweep stopped here"),
    ],
    ids=["ctrl-c", "ctrl-c-mid-fit", "sigterm-wrapped"],
)
def test_interrupted_job_in_a_multirun_is_recorded_and_stops_the_sweep(
    multirun_cfg, monkeypatch, capsys, error, code, recorded
):
    def interrupt(cfg):
        raise error

    monkeypatch.setattr(train_module, "train", interrupt)
    with pytest.raises(SystemExit) as exit_info:  # not NaN: the sweep must not go on
        train_module.main(multirun_cfg)
    assert exit_info.value.code == code
    metrics = json.loads((Path(multirun_cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["error"].startswith(recorded)
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {recorded}")
    # A stopped sweep never reaches Hydra's on_multirun_end, so the job writes the summary itself.
    rows = read_csv(Path(multirun_cfg.paths.output_dir).parent / "sweep_summary.csv")
    assert [(r["job"], r["status"]) for r in rows] == [("run", "interrupted")]


def test_outside_a_multirun_a_bug_keeps_its_traceback(tiny_cfg, monkeypatch):
    def fail(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_module, "train", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        train_module.main(tiny_cfg())


# ---- real multiruns on the tiny data ------------------------------------------------------------


def sweep_dir_of(root: Path) -> Path:
    (sweep,) = (root / "logs" / "train" / "multiruns").iterdir()
    return sweep


@pytest.mark.slow
def test_optuna_sweep_three_trials(tiny_mirror, tmp_path):
    # trainer.max_epochs=1 pins one searched key, the way a user fixes part of the search space.
    proc = run_cli(
        "-m", "hparams_search=head_optuna", "hydra.sweeper.n_trials=3", *tiny_overrides(tiny_mirror, tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "logs" / "train" / "studies" / "head_optuna"  # one folder per study
    rows = read_csv(sweep / "sweep_summary.csv")
    assert len(rows) == 3 and {r["job"] for r in rows} == {"0", "1", "2"}  # job dirs named by trial number
    assert all(r["status"] == "completed" for r in rows)
    values = [float(r["val/acc"]) for r in rows]
    assert all(math.isfinite(v) for v in values) and values == sorted(values, reverse=True)
    assert rows[0]["best"] == "*"
    assert len({r["model.optimizer.lr"] for r in rows}) == 3  # Optuna chose the values, not a grid
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(values[0]) and results.n_complete == 3
    assert results.storage == f"sqlite:///{sweep}/head_optuna.db"
    assert (sweep / "sweep_summary.md").is_file() and (sweep / "sweep_summary.png").is_file()
    # Cheap trials: one small head-only checkpoint each, the report without its plots.
    for job in ("0", "1", "2"):
        (ckpt,) = (sweep / job / "checkpoints").iterdir()
        assert ckpt.name.startswith("epoch_") and ckpt.stat().st_size < 1e6  # the ResNet18 backbone is 45 MB
        assert (sweep / job / "report.json").is_file() and not list((sweep / job).glob("*.png"))
    # ... which evaluate (like predict and export, through from_checkpoint) loads as any other.
    best = json.loads((sweep / rows[0]["job"] / "metrics.json").read_text())
    cfg = make_entry_cfg(
        "evaluate",
        [
            f"ckpt_path={best['best_model_path']}",
            *tiny_data_overrides(tiny_mirror, tmp_path),
            "trainer.precision=32-true",
        ],
        tmp_path / "eval",
    )
    assert evaluate(cfg)["accuracy"] == pytest.approx(best["test/acc"], abs=1e-6)
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()


@pytest.mark.slow
def test_grid_multirun_summary_sorted_with_seed_means_and_summarize_of_an_interrupted_sweep(
    tiny_mirror, tmp_path, capsys
):
    proc = run_cli("-m", *tiny_overrides(tiny_mirror, tmp_path), "model.head.dropout=0.0,0.5", "seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = sweep_dir_of(tmp_path)
    rows = read_csv(sweep / "sweep_summary.csv")
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    values = [float(r["val/acc"]) for r in rows]
    assert values == sorted(values, reverse=True) and rows[0]["best"] == "*"
    assert {(r["model.head.dropout"], r["seed"]) for r in rows} == {
        ("0.0", "1"),
        ("0.0", "2"),
        ("0.5", "1"),
        ("0.5", "2"),
    }
    groups = read_csv(sweep / "sweep_summary_by_config.csv")
    assert [g["seeds"] for g in groups] == ["2", "2"]
    for g in groups:
        dropout = g["overrides"].split("=")[1]
        mine = [float(r["val/acc"]) for r in rows if r["model.head.dropout"] == dropout]
        assert float(g["val/acc mean"]) == pytest.approx(statistics.fmean(mine))

    # As if the sweep had been killed during job 3: its metrics.json was never written.
    (sweep / "3" / "metrics.json").unlink()
    summarize.main([str(sweep)])  # python -m fmnist_tl.summarize SWEEP_DIR, in-process
    rows = read_csv(sweep / "sweep_summary.csv")
    assert [r["status"] for r in rows if r["job"] == "3"] == ["incomplete"]
    assert rows[-1]["job"] == "3" and "3 completed, 1 incomplete" in capsys.readouterr().out


@pytest.mark.slow
def test_joblib_two_parallel_jobs_share_cold_cache_separate_dirs_and_a_nan_job_recorded_as_failed(
    tiny_mirror, tmp_path
):
    proc = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *tiny_overrides(tiny_mirror, tmp_path),
        "model.optimizer.lr=1e-3,1e30",  # 1e30 blows the head up to a NaN loss at the first step
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = sweep_dir_of(tmp_path)
    jobs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(jobs) == ["0", "1"]
    assert jobs["0"]["status"] == "completed" and Path(jobs["0"]["best_model_path"]).parent.parent == sweep / "0"
    assert jobs["1"]["status"] == "failed" and "diverged" in jobs["1"]["error"]
    for job in ("0", "1"):  # each job kept its own config and log
        assert "model.optimizer.lr" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert (sweep / job / "train.log").is_file()
    # Cold feature cache, two parallel jobs: one entry per split, each extracted by one job only.
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "features").glob("*.json")]
    assert sorted(m["fingerprint"]["split"] for m in manifests) == ["test", "train", "val"]
    logs = "".join((sweep / job / "train.log").read_text() for job in ("0", "1"))
    for split in ("train", "val", "test"):
        assert logs.count(f"Extracted {split} features") == 1, logs
    # The other job loaded what the first extracted (the NaN job dies before it reaches the test split).
    assert logs.count("Feature cache hit for train") == 1 and logs.count("Feature cache hit for val") == 1
    rows = read_csv(sweep / "sweep_summary.csv")
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "failed")]
    assert float(rows[1]["model.optimizer.lr"]) == 1e30


@pytest.mark.slow
def test_optuna_trials_as_a_submitit_job_array_on_the_local_executor(tiny_mirror, tmp_path):
    # hydra/launcher=slurm's code path (hydra-submitit-launcher, a job array per batch of trials),
    # run by submitit's local executor: each trial in its own process, the two at once.
    proc = run_cli(
        "-m",
        "hparams_search=head_optuna",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        *tiny_overrides(tiny_mirror, tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "logs" / "train" / "studies" / "head_optuna"
    jobs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(jobs) == ["0", "1"] and all(j["status"] == "completed" for j in jobs.values())
    assert all(math.isfinite(j["val/acc"]) and math.isfinite(j["test/acc"]) for j in jobs.values())
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # run by submitit, not in-process
    rows = read_csv(sweep / "sweep_summary.csv")
    assert sorted(r["job"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"completed"}
    assert OmegaConf.load(sweep / "optimization_results.yaml").n_complete == 2


# ---- pruning in real head_optuna sweeps -----------------------------------------------------------

# Every trial is pruned after its 2nd of 3 epochs: val/acc is always below 1.1.
PRUNE_AT_2 = (
    "trainer.max_epochs=3",
    "hydra/sweeper/pruner=none",
    "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
    "+hydra.sweeper.pruner.lower=1.1",
    "+hydra.sweeper.pruner.n_warmup_steps=2",
)


def pruned_study(sweep: Path, n: int) -> None:
    """Every trial of the study: PRUNED after epoch 2 with its last value, and its job dir kept with
    status pruned and the 2 epochs it ran (also under ddp_spawn, whose processes send them back)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name="head_optuna", storage=f"sqlite:///{sweep}/head_optuna.db")
    assert len(study.trials) == n and {t.state for t in study.trials} == {TrialState.PRUNED}
    for trial in study.trials:
        metrics = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert metrics["status"] == "pruned" and metrics["pruned_at_epoch"] == 2
        assert metrics["epochs"] == 2 and set(trial.intermediate_values) == {1, 2}
        assert trial.value == pytest.approx(trial.intermediate_values[2]) == pytest.approx(metrics["val/acc"])
        assert Path(metrics["best_model_path"]).is_file() and math.isfinite(metrics["test/acc"])
    rows = read_csv(sweep / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["pruned"] * n and all(r["epochs"] == "2" for r in rows)
    assert f"epochs in jobs: {2 * n}" in (sweep / "sweep_summary.md").read_text()
    assert OmegaConf.load(sweep / "optimization_results.yaml").n_pruned == n


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        (),
        ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"),
        ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.sweeper.n_jobs=2"),
    ],
    ids=["basic", "joblib", "submitit_local"],
)
def test_pruned_trials_stop_cleanly_in_every_launcher(tiny_mirror, tmp_path, launcher):
    proc = run_cli("-m", "hparams_search=head_optuna", "hydra.sweeper.n_trials=2", *launcher,
                   *tiny_overrides(tiny_mirror, tmp_path), *PRUNE_AT_2)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pruned_study(tmp_path / "logs" / "train" / "studies" / "head_optuna", 2)


@pytest.mark.slow
def test_under_ddp_rank_0_decides_and_every_rank_stops_after_the_same_epoch(tiny_mirror, tmp_path):
    # A rank that kept training would wait for the other at its next all-reduce: the run would hang.
    proc = run_cli("-m", "hparams_search=head_optuna", "hydra.sweeper.n_trials=1",
                   *tiny_overrides(tiny_mirror, tmp_path), *DDP_SIM, *PRUNE_AT_2, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pruned_study(tmp_path / "logs" / "train" / "studies" / "head_optuna", 1)


@pytest.mark.slow
def test_a_trial_early_stopping_ended_is_completed_not_pruned(tiny_mirror, tmp_path):
    # Early stopping ends the fit after epoch 1 (val/acc >= 0), before the pruner's warm-up is over.
    proc = run_cli("-m", "hparams_search=head_optuna", "hydra.sweeper.n_trials=1",
                   *tiny_overrides(tiny_mirror, tmp_path), *PRUNE_AT_2,
                   "+callbacks.early_stopping.stopping_threshold=0.0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "logs" / "train" / "studies" / "head_optuna"
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1 and "pruned_at_epoch" not in metrics
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.n_complete == 1 and results.n_pruned == 0 and results.best_value == pytest.approx(metrics["val/acc"])
