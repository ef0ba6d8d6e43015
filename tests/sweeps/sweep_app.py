"""A tiny Hydra app for the sweeper's multi-process tests: `python -m tests.sweeps.sweep_app -m ...`.

It uses the real sweeper, launcher, job dirs and sweep summary, but a trial costs milliseconds
instead of a training run. Knobs (see sweep_app_conf/config.yaml): `rendezvous` makes each worker's
first trial wait until that many workers have one running, so a test knows every worker took part;
the environment variable SWEEP_APP_HANG_AT=N makes trial N hang (the command stays the same), so a
test can kill or interrupt the worker mid-trial. A trial "trains" `epochs` epochs whose objective
climbs to its final value (half of it after the first), reporting each to the sweeper's
`TrialPruning` as train's Lightning callback does; a pruned trial records `status: pruned`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

_first_trial = True


@hydra.main(version_base="1.3", config_path="sweep_app_conf", config_name="config")
def main(cfg: DictConfig) -> float:
    global _first_trial
    out = Path(HydraConfig.get().runtime.output_dir)
    sweep = Path(HydraConfig.get().sweep.dir)
    if cfg.rendezvous and _first_trial:
        (sweep / f".worker-{os.getpid()}").touch()
        deadline = time.time() + 120
        while len(list(sweep.glob(".worker-*"))) < cfg.rendezvous and time.time() < deadline:
            time.sleep(0.05)
    _first_trial = False
    if int(out.name) == int(os.environ.get("SWEEP_APP_HANG_AT", -1)):
        (out / "hanging").touch()
        time.sleep(600)
    value = {"diverge": float("nan"), "crash": None}.get(str(cfg.outcome), 1.0 - (cfg.x - 0.3) ** 2 - 0.01 * cfg.y)
    if value is None:
        raise RuntimeError("this trial raised")
    record = {"status": "completed", "val/acc": value, "epochs": cfg.epochs, "pid": os.getpid()}
    reporter = instantiate(cfg.callbacks.optuna_trial) if "optuna_trial" in (cfg.callbacks or {}) else None
    for epoch in range(1, cfg.epochs + 1):
        record["val/acc"] = value * min(1.0, (epoch + 1) / (cfg.epochs + 1))
        if reporter is not None and reporter.step(epoch, record["val/acc"], last=epoch == cfg.epochs):
            record.update(status="pruned", pruned_at_epoch=epoch, epochs=epoch)
            break
    (out / "metrics.json").write_text(json.dumps(record))
    return record["val/acc"]


if __name__ == "__main__":
    main()
