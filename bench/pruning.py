"""Which pruner head_optuna uses: the same 20-trial search without pruning and with each candidate
pruner, the same sampler and seeds; plus what a pruning decision costs on SQLite.

    python -m bench.pruning [--train 20000 --val 5000] [--seeds 0 1 2] [--extra-seeds 3] [--jobs 2]
                            [--results bench/results/DATE-pruning.json]
    python -m bench.pruning --decision-only [--decision median-s5-w2] [--results FILE]

- **Features (a proxy).** The targets assume warm caches of real 224 px ImageNet features; no
  ImageNet weights are available here, so the trials train on the features of a random-init
  ResNet18 at --size px (default 32) of real Fashion-MNIST images, split as the project splits the
  train file (data.val_size held out by a permutation seeded with the config's seed): --val images
  for validation, --train of the rest for training (55,000 is all of them). Extracted once into
  --cache.
- **The search is head_optuna's**: its search space (conf/hparams_search/head_optuna.yaml, with
  trainer.max_epochs fixed at --epochs), its TPE sampler and settings, built per trial by the
  sweeper's own `SamplerFactory`; each trial reports through the sweeper's own `TrialPruning.step`
  (the best val/acc so far after each epoch; the `-epoch` candidates report each epoch's own value
  instead) to an in-memory study with the candidate's pruner, built by `build_pruner`. The head,
  AdamW, batch size and per-epoch cosine schedule are the project's (model.head, model.optimizer,
  data.batch_size, model/scheduler=cosine).
- **Same trial, same curve.** A trial's training is seeded by (seed, its parameters), with its own
  RNG state, so a configuration learns the same curve whichever candidate samples it and whatever
  else trains in between; it is trained once, as far as the furthest candidate needed it ("head
  epochs" count what each search would have run). Curves are kept per seed in --cache, so a rerun
  or a new candidate trains only configurations not seen before.
- **Seeds are independent** (a curve's key holds its seed): --jobs runs them in parallel processes.
- **Decision cost.** A SQLite study in a temp dir, opened as a job opens it (`TrialPruning.trial`),
  with --trials trials of --epochs reports each under the --decision pruner (default: the one
  head_optuna configures): the time of report + should_prune per epoch, and of opening the trial (a
  trial's fixed cost). --decision-only measures only this (into --results' decision_cost, if given).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.pruning_curves import Curves, features  # noqa: E402

GOALS = {"epochs_share": 0.45, "best_val_acc_drop_pt": 0.3, "decision_ms": 20.0, "fixed_s": 3.0}


def median(startup: int, warmup: int) -> dict[str, Any]:
    return {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": startup, "n_warmup_steps": warmup}


def percentile(p: float, startup: int, warmup: int) -> dict[str, Any]:
    # Optuna keeps the top `percentile` % when maximizing: under 50 prunes more than the median.
    return {"_target_": "optuna.pruners.PercentilePruner", "percentile": p, "n_startup_trials": startup,
            "n_warmup_steps": warmup}  # fmt: skip


def patient(wrapped: dict[str, Any], patience: int) -> dict[str, Any]:
    return {"_target_": "optuna.pruners.PatientPruner", "wrapped_pruner": wrapped, "patience": patience}


def halving(min_resource: int, bootstrap: int = 0, factor: int = 3) -> dict[str, Any]:
    return {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": min_resource,
            "reduction_factor": factor, "bootstrap_count": bootstrap}  # fmt: skip


def hyperband(min_resource: int) -> dict[str, Any]:
    return {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": min_resource, "max_resource": 15,
            "reduction_factor": 3}  # fmt: skip


# The candidates: name -> hydra.sweeper.pruner (None: no pruning), the likelier ones to meet the
# targets first. A name ending in -epoch reports each epoch's own val/acc instead of the best so far.
CANDIDATES: dict[str, dict[str, Any] | None] = {
    "none": None,
    **{f"median-s{s}-w{w}": median(s, w) for s, w in ((5, 2), (5, 3), (8, 2))},
    "percentile40-s5-w3": percentile(40, 5, 3),
    **{f"hyperband-m{m}": hyperband(m) for m in (2, 3)},
    "median-s5-w2-epoch": median(5, 2),
    "percentile45-s5-w2": percentile(45, 5, 2),
    **{f"median-s{s}-w{w}": median(s, w) for s, w in ((3, 2), (5, 1), (8, 3), (5, 4))},
    "sha-m2-b2": halving(2, 2),
    "patient1-median-s5-w2": patient(median(5, 2), 1),
    "percentile40-s5-w2": percentile(40, 5, 2),
    **{f"median-s{s}-w{w}": median(s, w) for s, w in ((3, 3), (8, 1))},
    "percentile35-s5-w3": percentile(35, 5, 3),
    "sha-m3": halving(3),
    "sha-m2": halving(2),
    "hyperband-m1": hyperband(1),
    "median-s3-w1": median(3, 1),
    "sha-m2-r4": halving(2, factor=4),
}


def search(name: str, seed: int, n_trials: int, curves: Curves, cfg: Any) -> dict[str, Any]:
    """head_optuna's search (one sampler seed) with one candidate pruner, as the sweeper runs it."""
    import optuna
    from omegaconf import OmegaConf

    from fmnist_tl.sweeps.pruning import TrialPruning, build_pruner
    from fmnist_tl.sweeps.search_space import SamplerFactory, search_space
    from fmnist_tl.sweeps.study import StudyStore

    pruner_cfg = CANDIDATES[name]
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    params.pop("trainer.max_epochs", None)
    distributions, _ = search_space(params, [])
    sampler_cfg = {**OmegaConf.to_container(cfg.hydra.sweeper.sampler, resolve=False), "seed": seed}
    make_sampler = SamplerFactory(sampler_cfg, distributions)
    study_name = f"bench-{name}-{seed}"
    store = StudyStore("memory", Path("."), study_name)
    study = optuna.create_study(study_name=study_name, storage=store.storage, direction="maximize",
                                sampler=make_sampler(0), pruner=build_pruner(pruner_cfg))  # fmt: skip
    epochs, pruned = [], 0
    for number in range(n_trials):
        study.sampler = make_sampler(number)
        trial = study.ask(distributions)
        reporter = TrialPruning(store.job_spec(), study.study_name, trial.number, "val/acc", pruner_cfg)
        best = 0.0
        for epoch in range(1, curves.epochs + 1):
            value = curves.value(seed, trial.params, epoch)
            best = max(best, value)
            if name.endswith("-epoch"):
                reporter.best = None  # so step reports this epoch's value, not the best so far
            if reporter.step(epoch, value, last=epoch == curves.epochs):  # as on_validation_end asks
                break
        epochs.append(epoch)
        if reporter.pruned_at is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            pruned += 1
        else:
            study.tell(trial, best)  # train returns the best checkpoint's value
    # A search whose trials were all pruned finds nothing: successive halving with a bootstrap_count
    # prunes the first trials at each rung, and in a sequential search that can be every trial.
    done = [study.best_trial] if any(t.state.name == "COMPLETE" for t in study.trials) else []
    return {"candidate": name, "seed": seed, "head_epochs": sum(epochs), "pruned": pruned,
            "best_val_acc": done[0].value if done else 0.0, "best_trial": done[0].number if done else None}  # fmt: skip


def run_seed(job: tuple[int, argparse.Namespace]) -> tuple[list[dict[str, Any]], int, float]:
    """Every candidate's search for one sampler seed (a process of its own under --jobs)."""
    import optuna
    import torch

    from fmnist_tl.config import compose_config

    seed, args = job
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # features.head_threads=1, as a head trial on cached features trains
    cfg = compose_config("train", ["hparams_search=head_optuna"], return_hydra_config=True)
    data = features(args.size, args.train, args.val, int(cfg.seed), args.cache)
    name = f"curves-{args.size}px-{args.train}-{args.val}-e{args.epochs}-b{cfg.data.batch_size}-seed{seed}.json"
    curves = Curves(data, cfg, args.epochs, args.cache / name)
    runs = []
    for candidate in args.candidates:
        runs.append(search(candidate, seed, args.trials, curves, cfg))
        curves.save()
        print(f"[pruning] {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    return runs, curves.trained, curves.seconds


def decision_cost(pruner_cfg: dict | None, n_trials: int, epochs: int) -> dict[str, Any]:
    """report + should_prune per epoch, and opening a trial, on a SQLite study in a temp dir."""
    import optuna

    from fmnist_tl.sweeps.pruning import TrialPruning, build_pruner
    from fmnist_tl.sweeps.study import StudyStore

    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        store = StudyStore(None, Path(tmp), "cost")
        study = optuna.create_study(study_name="cost", storage=store.storage, direction="maximize",
                                    pruner=build_pruner(pruner_cfg))  # fmt: skip
        opens, decisions = [], []
        for _ in range(n_trials):
            trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
            start = time.perf_counter()
            reporter = TrialPruning(store.job_spec(), "cost", trial.number, "val/acc", pruner_cfg)
            reporter.trial()
            opens.append(time.perf_counter() - start)
            for epoch in range(1, epochs + 1):
                start = time.perf_counter()
                stop = reporter.step(epoch, trial.params["x"] * epoch / epochs)
                decisions.append(time.perf_counter() - start)
                if stop:
                    break
            if reporter.pruned_at is not None:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, reporter.best)
    decisions.sort()
    return {"storage": "sqlite", "trials": n_trials, "decisions": len(decisions),
            "decision_ms_median": 1000 * statistics.median(decisions),
            "decision_ms_p95": 1000 * decisions[int(0.95 * (len(decisions) - 1))],
            "decision_ms_max": 1000 * decisions[-1],
            "open_trial_s_median": statistics.median(opens), "open_trial_s_max": max(opens)}  # fmt: skip


def row(name: str, runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One candidate against no pruning, over the given seeds (share of epochs, drop of the best)."""
    base = {r["seed"]: r for r in runs if r["candidate"] == "none"}
    mine = [r for r in runs if r["candidate"] == name and r["seed"] in seeds and r["seed"] in base]
    if not mine:
        return {}
    shares = [r["head_epochs"] / base[r["seed"]]["head_epochs"] for r in mine]
    drops = [100 * (base[r["seed"]]["best_val_acc"] - r["best_val_acc"]) for r in mine]
    mean = statistics.fmean
    return {
        "seeds": [r["seed"] for r in mine],
        "head_epochs_mean": round(mean(r["head_epochs"] for r in mine), 1),
        "epochs_share_of_none": round(mean(shares), 3),
        "pruned_mean": round(mean(r["pruned"] for r in mine), 2),
        "best_val_acc_mean": round(mean(r["best_val_acc"] for r in mine), 4),
        "best_val_acc_drop_pt_mean": round(mean(drops), 2),
        "best_val_acc_drop_pt_max": round(max(drops), 2),
        "meets_targets": mean(shares) <= GOALS["epochs_share"] and mean(drops) <= GOALS["best_val_acc_drop_pt"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds of the recorded mean")
    parser.add_argument("--extra-seeds", type=int, nargs="*", default=[], help="more seeds, a robustness check")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15, help="trainer.max_epochs, fixed")
    parser.add_argument("--size", type=int, default=32, help="image size for the random-init ResNet18")
    parser.add_argument("--train", type=int, default=55000)
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--jobs", type=int, default=1, help="seeds searched in parallel processes")
    parser.add_argument("--cache", type=Path, default=REPO / "cache" / "bench-pruning", help="features and curves")
    parser.add_argument("--decision", choices=list(CANDIDATES), help="the SQLite cost's pruner (head_optuna's)")
    parser.add_argument("--decision-only", action="store_true", help="measure only the decision cost")
    parser.add_argument("--results", type=Path, help="write the results JSON here")
    args = parser.parse_args(argv)
    if "none" not in args.candidates:
        args.candidates.insert(0, "none")

    import optuna
    import torch

    from fmnist_tl.config import compose_config
    from fmnist_tl.core import atomic_write_text, cpu_model
    from fmnist_tl.sweeps.pruning import pruner_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    command = "python -m bench.pruning " + " ".join(sys.argv[1:] if argv is None else argv)
    load_start = os.getloadavg()
    cfg = compose_config("train", ["hparams_search=head_optuna"], return_hydra_config=True)
    decision = CANDIDATES[args.decision] if args.decision else pruner_config(cfg.hydra.sweeper.pruner)
    machine = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
               "optuna": optuna.__version__}  # fmt: skip
    if args.decision_only:
        cost = {"pruner": decision, **decision_cost(decision, args.trials, args.epochs), "command": command}
        cost |= {"load_average": {"start": load_start, "end": os.getloadavg()}, "machine": machine}
        print(json.dumps(cost, indent=1))
        if args.results:  # into the comparison's file when there is one, the rest of it kept
            doc = json.loads(args.results.read_text()) if args.results.is_file() else {"goals": GOALS}
            atomic_write_text(args.results, json.dumps({**doc, "decision_cost": cost}, indent=2, default=str) + "\n")
        return 0

    start = time.perf_counter()
    torch.set_num_threads(2)
    features(args.size, args.train, args.val, int(cfg.seed), args.cache)
    extract_s = time.perf_counter() - start
    seeds = args.seeds + [s for s in args.extra_seeds if s not in args.seeds]
    jobs = [(seed, args) for seed in seeds]
    if args.jobs > 1:
        # spawn, not fork: the parent's OpenMP threads (feature extraction) must not be forked.
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            done = pool.map(run_seed, jobs, chunksize=1)
    else:
        done = [run_seed(job) for job in jobs]
    runs = [r for seed_runs, _, _ in done for r in seed_runs]
    trained, seconds = sum(d[1] for d in done), sum(d[2] for d in done)
    rows = []
    for name in args.candidates:
        rows.append({"candidate": name, "pruner": CANDIDATES[name],
                     "reports": "epoch val/acc" if name.endswith("-epoch") else "best val/acc so far",
                     **row(name, runs, args.seeds)})  # fmt: skip
        if len(seeds) > len(args.seeds):
            rows[-1]["all_seeds"] = {k: v for k, v in row(name, runs, seeds).items() if k != "meets_targets"}
    cost = {"pruner": decision, **decision_cost(decision, args.trials, args.epochs)}
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "proxy": {
            "features": f"random-init ResNet18 at {args.size} px, real Fashion-MNIST images, standardised",
            "train_images": args.train,
            "val_images": args.val,
            "max_epochs": args.epochs,
            "seeds": args.seeds,
            "extra_seeds": args.extra_seeds,
            "trials": args.trials,
            "extraction_s": round(extract_s, 1),
            "head_epochs_trained": trained,
            "head_epoch_s_mean": round(seconds / max(1, trained), 3),
        },
        # "goals", not "targets": bench/render.py reads a file with targets as a `python -m bench` run.
        "goals": GOALS,
        "rows": rows,
        "decision_cost": cost,
        "runs": {f"{r['candidate']} seed {r['seed']}": r for r in runs},
        "notes": "",
    }
    print(json.dumps({"rows": rows, "decision_cost": cost}, indent=1))
    if args.results:
        atomic_write_text(args.results, json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
