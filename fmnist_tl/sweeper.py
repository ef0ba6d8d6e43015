"""fmnist_tl's Optuna sweeper for Hydra multiruns: ask/tell on Optuna >= 4, persistent and shared studies.

The Hydra plugin class is `hydra_plugins.fmnist_tl_sweeper.FmnistOptunaSweeper` (Hydra only
instantiates plugins defined under `hydra_plugins`); `run_study` here is the whole sweep.

- **Search space.** `hydra.sweeper.params` and the command line's sweep overrides, in Hydra's
  override grammar, parsed by Hydra's own parser (`search_space`): `interval`, `tag(log, ...)`,
  `int(...)`, `choice`, `range`. A plain `key=value` pins the key.
- **Outcomes.** A trial that raised, or returned NaN/inf or nothing, is told FAIL (user attr
  `failure` says why) and the study goes on. Ctrl-C or SIGTERM stops the sweep; the trials it hit
  are told FAIL without `failure`, so they count as lost, not as tried.
- **Persistent by default.** `hydra.sweeper.storage`: null is a SQLite file in the sweep dir named
  by the study (`<sweep dir>/<study_name>.db`); any SQLAlchemy URL; `journal:<path>` (Optuna's
  journal file, fit for shared file systems); `memory` for a throw-away study.
- **n_trials is the study's total.** Every worker (this command started again, on this machine or
  others) counts the study's trials under a lock (`StudyStore.lock`): completed, pruned, failed
  with a `failure`, and running ones. It asks only for what is missing and stops at the total.
  Lost trials are not counted, so a rerun replaces them.
- **Lost trials.** A trial left RUNNING by a worker that is gone is told FAIL by the next worker
  that takes the lock. On the same machine (same host name, boot and pid namespace) the worker's
  pid and process start time decide exactly, so a rerun right after a kill recovers at once and a
  live worker's trial is never touched. A worker elsewhere is judged by its heartbeat: a user attr
  (`heartbeat`, Unix time) its sweeper refreshes every `heartbeat_interval` seconds while the trial
  runs; it is lost after `grace_period` seconds without one. User attrs work the same in every
  storage (Optuna's own heartbeat is RDB-only); hosts' clocks must agree to well within the grace
  period (NTP).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from omegaconf import DictConfig, ListConfig, OmegaConf

from fmnist_tl.utils import FmnistError, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# Trial user attrs (shown by optuna-dashboard too).
FAILURE = "failure"  # why the objective failed (exception, NaN/inf, nothing): the trial counts as tried
WORKER = "worker"  # which process runs the trial: host, pid, and what tells whether it is still alive
HEARTBEAT = "heartbeat"  # Unix time, refreshed while the trial runs
JOB_DIR = "job_dir"
PINNED = "pinned_overrides"


# ---- search space --------------------------------------------------------------------------------


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


# ---- the sampler ---------------------------------------------------------------------------------


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
                log.warning(
                    "%s takes no %s: left out",
                    self.cls.__name__,
                    ", ".join(f"hydra.sweeper.sampler.{k}" for k in extra),
                )
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


# ---- storage, lock, liveness ---------------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """Start time of a live process (clock ticks since boot, /proc/<pid>/stat field 22), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "boot": _boot_id(),
        "pidns": _pid_namespace(),
        "started": process_start(pid),
    }


def worker_alive(worker: Mapping[str, Any], here: Mapping[str, Any]) -> bool | None:
    """True/False for a worker on this machine (same host, boot and pid namespace), None elsewhere."""
    if here["boot"] is None or any(worker.get(k) != here[k] for k in ("host", "boot", "pidns")):
        return None
    started = process_start(int(worker["pid"]))
    return started is not None and started == worker.get("started")


def hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL (journal:, memory)
        return url


class StudyStore:
    """An Optuna storage plus the lock that makes count-then-ask atomic across workers.

    SQLite: a file lock beside the database. Journal file: Optuna's symlink lock (works over NFS, as
    the journal does). PostgreSQL/MySQL: an advisory lock in the database itself. Another SQLAlchemy
    dialect gets no lock; the total then holds by a re-count after each ask (see `run_study`).
    """

    def __init__(self, spec: str | None, sweep_dir: Path, study_name: str) -> None:
        import optuna

        self._lock: Any = None
        self._advisory: tuple[Any, str, str, Any] | None = None
        self._lock_key = f"fmnist_tl.sweeper:{study_name}"
        spec = None if spec is None else str(spec)
        if spec in ("memory", ":memory:"):
            self.url, self.storage = "memory", optuna.storages.InMemoryStorage()
            return
        if spec is None:
            db = sweep_dir / f"{study_name}.db"
            spec = f"sqlite:///{db}"
        if spec.startswith("journal:"):
            path = Path(spec.removeprefix("journal:")).expanduser()
            if not str(path):
                raise FmnistError("hydra.sweeper.storage=journal: needs a file path, e.g. journal:/shared/study.log")
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage

            self.url = f"journal:{path}"
            self.storage = JournalStorage(JournalFileBackend(str(path)))
            self._lock = JournalFileSymlinkLock(f"{path}.sweeper")
            return
        self.url = spec
        self._open_rdb(spec)

    def _open_rdb(self, url: str) -> None:
        import optuna
        import sqlalchemy

        try:
            parsed = sqlalchemy.engine.make_url(url)
        except Exception as e:
            raise FmnistError(
                f"hydra.sweeper.storage={url} is not a storage: give a SQLAlchemy URL (sqlite:///x.db, "
                "postgresql://user@host/db), journal:<path>, memory, or null for a SQLite file in the sweep dir"
            ) from e
        backend, engine_kwargs = parsed.get_backend_name(), {}
        if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
            db = Path(parsed.database)
            db.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _FileLock(f"{db}.lock")
            # Several processes on one file: wait for SQLite's write lock instead of failing at once.
            engine_kwargs = {"connect_args": {"timeout": 60}}
        elif backend in ("postgresql", "mysql", "mariadb"):
            self._advisory = (sqlalchemy, url, backend, None)
        with self.lock():  # the first workers on a new database race to create its tables otherwise
            try:
                self.storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
            except (ImportError, ModuleNotFoundError) as e:
                raise FmnistError(
                    f"hydra.sweeper.storage={hide_password(url)} needs a database driver ({e}); "
                    "pip install it (psycopg for PostgreSQL, PyMySQL for MySQL)"
                ) from e
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise FmnistError(f"hydra.sweeper.storage={hide_password(url)}: cannot open it ({first})") from e

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        if self._advisory is not None:
            with self._advisory_lock():
                yield
            return
        if self._lock is None:
            yield
            return
        self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _advisory_lock(self) -> Iterator[None]:
        sqlalchemy, url, backend, engine = self._advisory
        if engine is None:
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            self._advisory = (sqlalchemy, url, backend, engine)
        key, text = self._lock_key, sqlalchemy.text
        with engine.connect() as conn:
            if backend == "postgresql":
                number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": number})
                release = (text("SELECT pg_advisory_unlock(:k)"), {"k": number})
            else:
                conn.execute(text("SELECT GET_LOCK(:k, -1)"), {"k": key})
                release = (text("SELECT RELEASE_LOCK(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(*release)


class _FileLock:
    """filelock's FileLock behind the acquire/release interface of Optuna's journal locks."""

    def __init__(self, path: str) -> None:
        import filelock

        self._lock = filelock.FileLock(path)

    def acquire(self) -> bool:
        self._lock.acquire()
        return True

    def release(self) -> None:
        self._lock.release()


class Heartbeat:
    """Refreshes the `heartbeat` user attr of running trials from a background thread."""

    def __init__(self, trials: Sequence[Any], interval: float) -> None:
        self.trials, self.interval = list(trials), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmnist-sweeper-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for trial in self.trials:
                try:
                    trial.set_user_attr(HEARTBEAT, time.time())
                except Exception as e:  # a storage hiccup: the next beat may pass; grace_period covers a few
                    log.warning("heartbeat for trial %d not recorded: %s", trial.number, e)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# ---- the study -----------------------------------------------------------------------------------


def trial_value(ret: JobReturn) -> tuple[float | None, str]:
    """(finite objective, "") for a usable trial, else (None, why it failed)."""
    try:
        value = ret.return_value  # re-raises the job's exception when the job raised
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None, f"the job returned {value!r}, not a number"
    if not math.isfinite(value):
        return None, f"the job returned {value} (see its metrics.json)"
    return value, ""


def counts_toward_total(trial: Any) -> bool:
    """Completed, pruned, running, or failed by its own outcome; lost trials (worker gone) do not count."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return FAILURE in trial.user_attrs
    return True


@dataclass
class SweepSettings:
    """hydra.sweeper as configured (see hydra_plugins/fmnist_tl_sweeper)."""

    sampler: Any
    direction: Any
    study_name: str | None
    storage: str | None
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    params: Any
    heartbeat_interval: float
    grace_period: float

    def check(self) -> None:
        for key, low in (("n_trials", 1), ("n_jobs", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FmnistError(f"hydra.sweeper.{key}={value!r} must be an integer >= {low}")
        if not 0.0 <= float(self.max_failure_rate) <= 1.0:
            raise FmnistError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate} must be in [0, 1]")
        if not 0 < float(self.heartbeat_interval) < float(self.grace_period):
            raise FmnistError(
                f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval} must be positive and below "
                f"hydra.sweeper.grace_period={self.grace_period}"
            )

    def one_direction(self) -> str:
        direction = self.direction
        if isinstance(direction, (list, tuple, ListConfig)):
            if len(direction) != 1:
                raise FmnistError(
                    f"hydra.sweeper.direction={list(direction)}: give one direction (train returns one objective)"
                )
            direction = direction[0]
        direction = str(getattr(direction, "name", direction)).lower()
        if direction not in ("minimize", "maximize"):
            raise FmnistError(f"hydra.sweeper.direction={direction} must be minimize or maximize")
        return direction


def _check_study(study: Any, direction: str, distributions: Mapping[str, Any], where: str) -> None:
    """A loaded study must have the same direction and a search space its trials fit."""
    from optuna.distributions import check_distribution_compatibility

    ours = study.direction.name.lower()
    if ours != direction:
        raise FmnistError(
            f"study {study.study_name} in {where} maximises/minimises differently ({ours}, not {direction}); "
            "pick another hydra.sweeper.study_name"
        )
    for trial in study.get_trials(deepcopy=False):
        for key, old in trial.distributions.items():
            if key in distributions:
                try:
                    check_distribution_compatibility(old, distributions[key])
                except ValueError as e:
                    raise FmnistError(
                        f"study {study.study_name} in {where} searched {key} as {old}, now {distributions[key]} "
                        f"({e}); keep its search space or pick another hydra.sweeper.study_name"
                    ) from e


def _job_dirs(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        return []
    return [d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit() and (d / ".hydra").is_dir()]


def _mark_lost(study: Any, here: Mapping[str, Any], grace: float, sweep_dir: Path) -> int:
    """Tell FAIL the running trials whose worker is gone (see the module doc). Returns how many."""
    from optuna.trial import TrialState

    now, lost = time.time(), 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker, beat = trial.user_attrs.get(WORKER), trial.user_attrs.get(HEARTBEAT)
        if not isinstance(worker, dict):
            continue  # not one of ours: leave it to whoever asked for it
        alive = worker_alive(worker, here)
        where = f"pid {worker.get('pid')} on {worker.get('host')}"
        if alive is False:
            why = f"its worker ({where}) is gone"
        elif alive is None and isinstance(beat, (int, float)) and now - beat > grace:
            why = f"no heartbeat from its worker ({where}) for {now - beat:.0f} s > grace_period {grace:g} s"
        else:
            continue
        finish_trial(study, trial.number)
        lost += 1
        log.warning("Trial %d lost: %s; told FAIL, a new trial replaces it", trial.number, why)
        record_lost(Path(str(trial.user_attrs.get(JOB_DIR, sweep_dir / str(trial.number)))), f"lost: {why}")
    return lost


def record_lost(job_dir: Path, why: str) -> None:
    """A lost trial's job dir says so in the sweep summary, unless its job recorded its own end."""
    if job_dir.is_dir() and not (job_dir / "metrics.json").exists():
        atomic_write_json(job_dir / "metrics.json", {"status": "interrupted", "error": f"{why}; told FAIL to Optuna"})


def trial_overrides(trial: Any, pinned: Mapping[str, str]) -> list[str]:
    """The job's overrides: the trial's values, the pinned keys, and its own job dir (the trial number)."""
    values = [f"{k}={v}" for k, v in trial.params.items()]
    return [*values, *(f"{k}={v}" for k, v in pinned.items()), f"hydra.sweep.subdir={trial.number}"]


def run_study(sweeper: Any, arguments: Sequence[str]) -> None:
    """Ask, launch and tell until the study holds `n_trials` trials that count (see the module doc).

    `sweeper` is the Hydra plugin, set up by Hydra: `settings`, `config` and `launcher`.
    """
    import optuna
    from optuna.trial import TrialState

    settings: SweepSettings = sweeper.settings
    settings.check()
    direction = settings.one_direction()
    distributions, pinned = search_space(settings.params, arguments)
    config = sweeper.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    study_name = str(settings.study_name or config.hydra.job.name)
    make_sampler = SamplerFactory(settings.sampler, distributions)
    n_trials = settings.n_trials
    if make_sampler.grid_size is not None and make_sampler.grid_size < n_trials:
        log.info("The grid has %d points: n_trials %d -> %d", make_sampler.grid_size, n_trials, make_sampler.grid_size)
        n_trials = make_sampler.grid_size

    store = StudyStore(settings.storage, sweep_dir, study_name)
    where = hide_password(store.url)
    with store.lock():
        study = optuna.create_study(
            study_name=study_name,
            storage=store.storage,
            sampler=make_sampler(0),
            direction=direction,
            load_if_exists=True,
        )
        existing = study.get_trials(deepcopy=False)
        if not existing and _job_dirs(sweep_dir):
            raise FmnistError(
                f"{sweep_dir} holds job dirs of another study, but study {study_name} in {where} is new; "
                "move them away, or pass another hydra.sweep.dir (or the storage that study used)"
            )
    _check_study(study, direction, distributions, where)
    here = worker_identity()
    log.info(
        "Study %s in %s: %d trials in total (%d already in it), %s %s over %s; job dirs in %s",
        study_name,
        where,
        n_trials,
        sum(counts_toward_total(t) for t in existing),
        direction,
        config.get("optimized_metric", "the objective"),
        ", ".join(sorted(distributions)) or "nothing",
        sweep_dir,
    )
    if where != "memory":
        log.info("Watch it with: optuna-dashboard %s", where.removeprefix("journal:"))

    launched = failed = 0
    while True:
        with store.lock():
            _mark_lost(study, here, float(settings.grace_period), sweep_dir)
            trials = study.get_trials(deepcopy=False)
            todo = n_trials - sum(counts_toward_total(t) for t in trials)
            if todo <= 0:
                running = sum(t.state == TrialState.RUNNING for t in trials)
                if running:
                    log.info("Study %s: all %d trials asked; %d still running elsewhere", study_name, n_trials, running)
                break
            batch = []
            for i in range(min(settings.n_jobs, todo)):
                study.sampler = make_sampler(len(trials) + i)
                trial = study.ask(distributions)
                trial.set_user_attr(WORKER, here)
                trial.set_user_attr(HEARTBEAT, time.time())
                trial.set_user_attr(JOB_DIR, str(sweep_dir / str(trial.number)))
                trial.set_user_attr(PINNED, [f"{k}={v}" for k, v in pinned.items()])
                batch.append(trial)
        batch = _drop_surplus(study, batch, n_trials)
        if not batch:
            break
        with Heartbeat(batch, float(settings.heartbeat_interval)):
            try:
                returns = sweeper.launcher.launch(
                    [trial_overrides(t, pinned) for t in batch], initial_job_idx=batch[0].number
                )
            except BaseException as e:
                # Ctrl-C, SIGTERM (train exits after recording the job), or a launcher error: these
                # trials did not run to their end. Without a `failure` attr they do not count.
                for trial in batch:
                    finish_trial(study, trial)
                    record_lost(sweep_dir / str(trial.number), f"stopped ({type(e).__name__})")
                log.error("Sweep stopped (%s); trials %s told FAIL", type(e).__name__, [t.number for t in batch])
                raise
        launched += len(returns)
        for trial, ret in zip(batch, returns, strict=True):
            value, why = trial_value(ret)
            finish_trial(study, trial, value, why or None)
            if value is None:
                failed += 1
                log.warning("Trial %d failed (told to Optuna as FAIL): %s", trial.number, why)
        if failed / launched > settings.max_failure_rate:
            log.error(
                "Stopping: %d of the %d trials this worker ran failed (hydra.sweeper.max_failure_rate=%s)",
                failed,
                launched,
                settings.max_failure_rate,
            )
            break
    with store.lock():
        write_results(study, sweep_dir, where)


def _drop_surplus(study: Any, batch: list[Any], n_trials: int) -> list[Any]:
    """Without a lock (an RDB other than SQLite/PostgreSQL/MySQL), two workers may ask at once: keep
    only trials whose number is within the total, and tell the others FAIL before they run."""

    earlier = [t.number for t in study.get_trials(deepcopy=False) if counts_toward_total(t)]
    keep = []
    for trial in batch:
        if sum(n < trial.number for n in earlier) < n_trials:
            keep.append(trial)
        else:
            finish_trial(study, trial)
            log.info("Trial %d not run: another worker reached the study's total first", trial.number)
    return keep


def finish_trial(study: Any, trial: Any, value: float | None = None, failure: str | None = None) -> None:
    """Tell Optuna a trial's end: COMPLETE with `value`, else FAIL (with `failure` when its outcome failed).

    `trial` is a Trial or a trial number. A trial another worker finished meanwhile (judged lost for
    want of a heartbeat) is left as it is.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        if value is not None:
            study.tell(trial, value, skip_if_finished=True)
            return
        if failure is not None:
            trial.set_user_attr(FAILURE, failure)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except UpdateFinishedTrialError as e:
        number = getattr(trial, "number", trial)
        log.warning("Trial %d had been marked failed by another worker (%s); its job dir keeps its result", number, e)
    except RuntimeError as e:
        if "Study.stop" not in str(e):  # the grid sampler stops the study when its grid is done
            raise


def write_results(study: Any, sweep_dir: Path, where: str) -> None:
    """optimization_results.yaml in the sweep dir: the whole study, as hydra-optuna-sweeper named its keys."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by_state = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "storage": where,
        "n_trials": len(trials),
        "n_complete": by_state["complete"],
        "n_failed": sum(t.state == TrialState.FAIL and FAILURE in t.user_attrs for t in trials),
        "n_lost": sum(t.state == TrialState.FAIL and FAILURE not in t.user_attrs for t in trials),
        "n_running": by_state["running"],
    }
    if not by_state["complete"]:
        log.error("No trial completed; see sweep_summary.md and each job's metrics.json for why")
    else:
        best = study.best_trial
        results = {**results, "best_params": best.params, "best_value": best.value, "best_trial": best.number}
        log.info("Best trial %d: %s = %s", best.number, best.params, best.value)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(results)))
