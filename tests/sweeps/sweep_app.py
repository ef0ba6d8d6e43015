"""A tiny Hydra app for the sweeper's multi-process tests: `python -m tests.sweeps.sweep_app -m ...`.

It uses the real sweeper, launcher, job dirs and sweep summary, but a trial costs milliseconds
instead of a training run. Knobs (see sweep_app_conf/config.yaml): `rendezvous` makes each worker's
first trial wait until that many workers have one running, so a test knows every worker took part;
the environment variable SWEEP_APP_HANG_AT=N makes trial N hang (the command stays the same), so a
test can kill or interrupt the worker mid-trial.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
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
    (out / "metrics.json").write_text(json.dumps({"status": "completed", "val/acc": value, "pid": os.getpid()}))
    return value


if __name__ == "__main__":
    main()
