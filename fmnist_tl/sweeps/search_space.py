"""What a sweep searches and how each trial's values are drawn.

- **Search space.** `hydra.sweeper.params` and the command line's sweep overrides, in Hydra's
  override grammar, parsed by Hydra's own parser (`search_space`): `interval`, `tag(log, ...)`,
  `int(...)`, `choice`, `range`. A plain `key=value` pins the key.
- **Sampler.** `hydra.sweeper.sampler`, a `_target_` config, built afresh for each trial
  (`SamplerFactory`).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fmnist_tl.core import FmnistError

log = logging.getLogger(__name__)


def distribution_for(key: str, override: Any) -> Any:
    """The Optuna distribution of one parsed sweep override (Hydra's `Override`)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    shuffled = getattr(value, "shuffle", False)
    if shuffled:  # the sampler picks the order; a fixed one keeps the distribution equal across workers
        value.shuffle = False
    try:
        if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and shuffled):
            # Encoded as override text ("[256,128]", quoted strings), which is what a trial passes on.
            return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
        if isinstance(value, RangeSweep):
            # Hydra's range stops before `stop`, as Python's does; Optuna's bounds are inclusive.
            values = list(override.sweep_iterator())
            if not values:
                raise ValueError(f"{override.input_line.split('=', 1)[1]} is empty")
            step, last = value.step, values[-1]
            if all(isinstance(v, int) for v in (value.start, value.stop, step)):
                return IntDistribution(int(value.start), int(last), step=int(step))
            return FloatDistribution(float(value.start), float(last), step=float(step))
        if isinstance(value, IntervalSweep):
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):  # int(interval(a, b))
                return IntDistribution(value.start, value.end, log=log_scale)
            return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    except ValueError as e:
        raise FmnistError(f"hydra.sweeper.params.{key}: {e}") from e
    raise FmnistError(
        f"hydra.sweeper.params.{key}={override.input_line.split('=', 1)[1]} is not a search space; "
        "use interval(a,b), tag(log, interval(a,b)), int(interval(a,b)), choice(...) or range(...)"
    )


def search_space(params: Mapping[str, Any] | None, arguments: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(distributions, pinned overrides) from hydra.sweeper.params, then the command line's overrides.

    A later expression for a key replaces an earlier one; a plain `key=value` pins the key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    parser = OverridesParser.create()
    distributions: dict[str, Any] = {}
    pinned: dict[str, str] = {}
    for line in lines:
        try:
            override = parser.parse_override(line)
        except HydraException as e:
            first = str(e).strip().splitlines()[0]
            raise FmnistError(f"cannot parse the sweep override {line!r}: {first}") from e
        key = override.get_key_element()
        distributions.pop(key, None)
        pinned.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = distribution_for(key, override)
        else:
            pinned[key] = override.get_value_element_as_str()
    return distributions, pinned


def grid_space(distributions: Mapping[str, Any]) -> dict[str, list[Any]]:
    """GridSampler's search space: every value of each (discrete) distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    grid: dict[str, list[Any]] = {}
    for key, d in distributions.items():
        if isinstance(d, CategoricalDistribution):
            grid[key] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            grid[key] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            n = round((d.high - d.low) / d.step)
            grid[key] = [d.low + i * d.step for i in range(n + 1)]
        else:
            raise FmnistError(
                f"hydra/sweeper/sampler=grid needs discrete values; {key} is continuous ({d}): "
                "use choice(...) or range(...)"
            )
    return grid


class SamplerFactory:
    """Builds the configured sampler (`hydra.sweeper.sampler`, a `_target_` config) for each trial.

    With a `seed`, each trial's sampler is seeded from (seed, trial number): one worker asks the same
    trials for the same seed, and several workers on one study do not all draw the same "random"
    startup trials, as they would with one shared seed. QMCSampler and GridSampler are the
    exceptions: their seed orders one sequence or grid that every trial and worker must share.
    """

    def __init__(self, cfg: DictConfig | Mapping[str, Any], distributions: Mapping[str, Any]) -> None:
        from hydra.utils import get_class

        self.cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        target = self.cfg.get("_target_")
        if not target:
            raise FmnistError("hydra.sweeper.sampler needs a _target_, e.g. optuna.samplers.TPESampler")
        try:
            self.cls = get_class(target)
        except Exception as e:
            raise FmnistError(f"hydra.sweeper.sampler._target_={target} is not a class ({e})") from e
        import optuna

        self.grid_size: int | None = None
        if issubclass(self.cls, optuna.samplers.GridSampler):
            grid = grid_space(distributions)
            self.cfg["search_space"] = grid
            self.grid_size = math.prod(len(v) for v in grid.values())
        accepted = inspect.signature(self.cls).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            extra = sorted(k for k in self.cfg if not k.startswith("_") and k not in accepted)
            if extra:
                settings = ", ".join(f"hydra.sweeper.sampler.{k}" for k in extra)
                log.warning("%s takes no %s: left out", self.cls.__name__, settings)
                for key in extra:
                    del self.cfg[key]
        seed = self.cfg.get("seed")
        same_seed_everywhere = (optuna.samplers.QMCSampler, optuna.samplers.GridSampler)
        self.seed = None if seed is None or issubclass(self.cls, same_seed_everywhere) else int(seed)
        self(0)  # a bad setting fails here, before any trial

    def __call__(self, trial_number: int) -> Any:
        from hydra.utils import instantiate

        cfg = dict(self.cfg)
        if self.seed is not None:
            digest = hashlib.sha256(f"{self.seed}:{trial_number}".encode()).digest()
            cfg["seed"] = int.from_bytes(digest[:4], "big")
        try:
            return instantiate(cfg, _convert_="all")
        except Exception as e:
            cause = e.__cause__ or e
            raise FmnistError(f"hydra.sweeper.sampler: cannot build {self.cfg['_target_']} ({cause})") from e
