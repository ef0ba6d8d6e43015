"""Which pruner head_optuna uses: the same 20-trial search with none, median, successive halving and
hyperband, the same sampler and seeds; plus what a pruning decision costs on SQLite.

    python -m bench.pruning [--seeds 0 1 2] [--trials 20] [--results bench/results/DATE-pruning.json]

- **Features (a proxy).** The targets assume warm caches of real 224 px ImageNet features; no
  ImageNet weights are available here, so the trials train on the features of a random-init
  ResNet18 at --size px (default 32) of real Fashion-MNIST images: --train images of the train
  split for training, the next --val for validation (as data.val_size holds out). A head's epoch
  then costs a fraction of a second, so the whole comparison takes minutes on 2 shared cores.
- **The search is head_optuna's**: its search space (conf/hparams_search/head_optuna.yaml, with
  trainer.max_epochs fixed at --epochs), its TPE sampler and settings, built per trial by the
  sweeper's own `SamplerFactory`; each trial reports through the sweeper's own `TrialPruning.step`
  (the best val/acc so far after each epoch) to an in-memory study with the candidate's pruner,
  built by `build_pruner`. The head, AdamW, batch size and per-epoch cosine schedule are the
  project's (model.head, model.optimizer, data.batch_size, model/scheduler=cosine).
- **Same trial, same curve.** A trial's training is seeded by (seed, its parameters), so a
  configuration that two candidates both sample learns the same curve; it is trained once, as far
  as the furthest candidate needed it ("head epochs" count what each search would have run).
- **Decision cost.** A SQLite study in a temp dir, opened as a job opens it (`TrialPruning.trial`),
  with --trials trials of --epochs reports each under the chosen pruner: the time of
  report + should_prune per epoch, and of opening the trial (a trial's fixed cost).
"""

from __future__ import annotations

import argparse
import json
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

TARGETS = {"epochs_share": 0.45, "best_val_acc_drop_pt": 0.3, "decision_ms": 20.0, "fixed_s": 3.0}
# The candidates: name -> hydra.sweeper.pruner (None: no pruning).
CANDIDATES: dict[str, dict[str, Any] | None] = {
    "none": None,
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 2},
    "median-w4": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 4},
    "sha-r3": {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 1, "reduction_factor": 3},
    "sha-r3-m2": {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 2, "reduction_factor": 3},
    "hyperband-r3": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": 15,
        "reduction_factor": 3,
    },  # fmt: skip
}


def features(size: int, n_train: int, n_val: int) -> tuple[Any, Any, Any, Any]:
    """Random-init ResNet18 features of real Fashion-MNIST images (train, val), made once."""
    import torch
    import torchvision
    from torch.nn import functional as F

    from fmnist_tl.data import IMAGENET_MEAN, IMAGENET_STD
    from fmnist_tl.data.raw_files import parse_idx, read_gz

    mirror = Path("/usr/share/datasets/fashion-mnist")
    images = parse_idx(read_gz(mirror / "train-images-idx3-ubyte.gz"), "train images", "images", None)
    labels = parse_idx(read_gz(mirror / "train-labels-idx1-ubyte.gz"), "train labels", "labels", None)
    images, labels = images[: n_train + n_val], labels[: n_train + n_val].long()
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for batch in images.split(512):
            x = F.interpolate(batch.float().unsqueeze(1) / 255, size=(size, size), mode="bilinear")
            out.append(net((x.expand(-1, 3, -1, -1) - mean) / std))
    feats = torch.cat(out)
    feats = (feats - feats[:n_train].mean(0)) / (feats[:n_train].std(0) + 1e-6)
    return feats[:n_train], labels[:n_train], feats[n_train:], labels[n_train:]


class Curves:
    """Each configuration's val/acc per epoch, trained once and only as far as any search needed."""

    def __init__(self, data: tuple[Any, ...], cfg: Any, epochs: int) -> None:
        self.data, self.cfg, self.epochs = data, cfg, epochs
        self.runs: dict[tuple, dict[str, Any]] = {}
        self.seconds = 0.0
        self.trained = 0

    def value(self, seed: int, params: dict[str, Any], epoch: int) -> float:
        import hashlib

        import hydra
        import torch
        import yaml
        from torch import nn

        from fmnist_tl.training import build_head

        key = (seed, tuple(sorted(params.items())))
        run = self.runs.get(key)
        if run is None:
            digest = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:4], "big")
            torch.manual_seed(digest)
            x = self.data[0]
            head = build_head(x.shape[1], 10, yaml.safe_load(params["model.head.hidden_dims"]),
                              params["model.head.dropout"])  # fmt: skip
            opt_cfg = {**self.cfg.model.optimizer, "lr": params["model.optimizer.lr"],
                       "weight_decay": params["model.optimizer.weight_decay"]}  # fmt: skip
            optimizer = hydra.utils.instantiate(opt_cfg)(head.parameters())
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
            run = self.runs[key] = {"head": head, "opt": optimizer, "sched": schedule, "curve": [],
                                    "gen": torch.Generator().manual_seed(digest)}  # fmt: skip
        xt, yt, xv, yv = self.data
        batch = int(self.cfg.data.batch_size)
        while len(run["curve"]) < epoch:
            start = time.perf_counter()
            head, optimizer = run["head"], run["opt"]
            head.train()
            order = torch.randperm(len(yt), generator=run["gen"])
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                loss = nn.functional.cross_entropy(head(xt[idx]), yt[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            run["sched"].step()
            head.eval()
            with torch.inference_mode():
                acc = (head(xv).argmax(1) == yv).float().mean().item()
            run["curve"].append(acc)
            self.seconds += time.perf_counter() - start
            self.trained += 1
        return run["curve"][epoch - 1]


def search(name: str, pruner_cfg: dict | None, seed: int, n_trials: int, curves: Curves, cfg: Any) -> dict[str, Any]:
    """head_optuna's search (one sampler seed) with one pruner, as the sweeper runs it."""
    import optuna
    from omegaconf import OmegaConf

    from fmnist_tl.sweeps.pruning import TrialPruning, build_pruner
    from fmnist_tl.sweeps.search_space import SamplerFactory, search_space
    from fmnist_tl.sweeps.study import StudyStore

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
        for epoch in range(1, curves.epochs + 1):
            if reporter.step(epoch, curves.value(seed, trial.params, epoch)):
                break
        epochs.append(epoch)
        if reporter.pruned_at is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            pruned += 1
        else:
            study.tell(trial, reporter.best)
    return {"candidate": name, "seed": seed, "head_epochs": sum(epochs), "pruned": pruned,
            "best_val_acc": study.best_value, "best_trial": study.best_trial.number}  # fmt: skip


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15, help="trainer.max_epochs, fixed")
    parser.add_argument("--size", type=int, default=32, help="image size for the random-init ResNet18")
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--decision", default="median", choices=list(CANDIDATES), help="pruner for the SQLite cost")
    parser.add_argument("--results", type=Path, help="write the results JSON here")
    args = parser.parse_args(argv)

    import optuna
    import torch

    from fmnist_tl.config import compose_config
    from fmnist_tl.core import atomic_write_text, cpu_model

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # features.head_threads=1, as a head trial on cached features trains
    load_start = os.getloadavg()
    cfg = compose_config("train", ["hparams_search=head_optuna"], return_hydra_config=True)
    start = time.perf_counter()
    torch.set_num_threads(2)
    data = features(args.size, args.train, args.val)
    extract_s = time.perf_counter() - start
    torch.set_num_threads(1)
    curves = Curves(data, cfg, args.epochs)
    runs = []
    for seed in args.seeds:
        for name in args.candidates:
            run = search(name, CANDIDATES[name], seed, args.trials, curves, cfg)
            runs.append(run)
            print(f"[pruning] {json.dumps(run)}", file=sys.stderr)
    rows = []
    by_name = {n: [r for r in runs if r["candidate"] == n] for n in args.candidates}
    base = {r["seed"]: r for r in by_name.get("none", [])}
    for name, mine in by_name.items():
        shares = [r["head_epochs"] / base[r["seed"]]["head_epochs"] for r in mine if r["seed"] in base]
        drops = [100 * (base[r["seed"]]["best_val_acc"] - r["best_val_acc"]) for r in mine if r["seed"] in base]
        rows.append(
            {
                "candidate": name,
                "pruner": CANDIDATES[name],
                "head_epochs_mean": statistics.fmean(r["head_epochs"] for r in mine),
                "epochs_share_of_none": round(statistics.fmean(shares), 3) if shares else None,
                "pruned_mean": statistics.fmean(r["pruned"] for r in mine),
                "best_val_acc_mean": round(statistics.fmean(r["best_val_acc"] for r in mine), 4),
                "best_val_acc_drop_pt_mean": round(statistics.fmean(drops), 2) if drops else None,
                "best_val_acc_drop_pt_max": round(max(drops), 2) if drops else None,
                "meets_targets": bool(shares and drops)
                and statistics.fmean(shares) <= TARGETS["epochs_share"]
                and statistics.fmean(drops) <= TARGETS["best_val_acc_drop_pt"],
            }
        )
    cost = decision_cost(CANDIDATES[args.decision], args.trials, args.epochs)
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m bench.pruning " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "optuna": optuna.__version__,
        },  # fmt: skip
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "proxy": {
            "features": f"random-init ResNet18 at {args.size} px, real Fashion-MNIST images, standardised",
            "train_images": args.train,
            "val_images": args.val,
            "max_epochs": args.epochs,
            "seeds": args.seeds,
            "trials": args.trials,
            "extraction_s": round(extract_s, 1),
            "head_epochs_trained": curves.trained,
            "head_epoch_s_mean": round(curves.seconds / max(1, curves.trained), 3),
        },
        # "goals", not "targets": bench/render.py reads a file with targets as a `python -m bench` run.
        "goals": TARGETS,
        "rows": rows,
        "decision_cost": {"pruner": CANDIDATES[args.decision], **cost},
        "runs": runs,
        "notes": "",
    }
    print(json.dumps({"rows": rows, "decision_cost": doc["decision_cost"]}, indent=1))
    if args.results:
        atomic_write_text(args.results, json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
