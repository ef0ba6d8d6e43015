"""An Optuna study in its storage, shared by any number of sweeper workers (docs/sweeps.md).

- **Storage** (`StudyStore`): `hydra.sweeper.storage` null is `<sweep dir>/<study_name>.db`
  (SQLite); else any SQLAlchemy URL, `journal:<path>` (Optuna's journal file) or `memory`.
- **One worker at a time counts and asks** (`StudyStore.lock`), so n_trials holds across workers.
- **Lost trials.** A trial left RUNNING by a worker that is gone is told FAIL by the next worker
  that takes the lock (`mark_lost`). On the same machine (same host name, boot and pid namespace)
  the worker's pid and process start time decide exactly, so a live worker's trial is never
  touched. A worker elsewhere is lost after `grace_period` seconds without a `heartbeat` user attr
  (Unix time, refreshed by `Heartbeat`): user attrs work in every storage (Optuna's own heartbeat
  is RDB-only); hosts' clocks must agree to well within the grace period (NTP).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fmnist_tl.core import FmnistError, atomic_write_json

log = logging.getLogger(__name__)

# Trial user attrs (shown by optuna-dashboard too).
FAILURE = "failure"  # why the objective failed (exception, NaN/inf, nothing): the trial counts as tried
WORKER = "worker"  # which process runs the trial: host, pid, and what tells whether it is still alive
HEARTBEAT = "heartbeat"  # Unix time, refreshed while the trial runs
JOB_DIR = "job_dir"
PINNED = "pinned_overrides"

# Storages that live in this process (`memory` studies) by key: a job of the basic launcher, which
# runs in the sweeper's process, reaches one as `memory:<key>` (`in_process_spec`).
IN_PROCESS: dict[str, Any] = {}


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
    dialect gets no lock; the total then holds by a re-count after each ask (fmnist_tl.sweeps.sweeper).
    """

    def __init__(self, spec: str | None, sweep_dir: Path, study_name: str) -> None:
        import optuna

        self._lock: Any = None
        self._advisory: str | None = None  # postgresql, mysql or mariadb: the lock is in the database
        self._engine: Any = None
        self._lock_key = f"fmnist_tl.sweeps.sweeper:{study_name}"
        spec = None if spec is None else str(spec)
        if spec in ("memory", ":memory:"):
            self.url, self.storage = "memory", optuna.storages.InMemoryStorage()
            return
        if spec is not None and spec.startswith(
            "memory:"
        ):  # a job's spec for its sweeper's memory study (same process only)
            self.url, self.storage = "memory", IN_PROCESS.get(spec.removeprefix("memory:"))
            if self.storage is None:
                raise FmnistError(
                    "hydra.sweeper.storage=memory is not reachable from this process (a launcher or DDP "
                    "started it): use hydra.sweeper.storage=null (a SQLite file in the sweep dir) or journal:<path>"
                )
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
        import filelock
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
            self._lock = filelock.FileLock(f"{db}.lock")
            # Several processes on one file: wait for SQLite's write lock instead of failing at once.
            engine_kwargs = {"connect_args": {"timeout": 60}}
        elif backend in ("postgresql", "mysql", "mariadb"):
            self._advisory = backend
        with self.lock():  # the first workers on a new database race to create its tables otherwise
            try:
                self.storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
            except ImportError as e:
                raise FmnistError(
                    f"hydra.sweeper.storage={hide_password(url)} needs a database driver ({e}); "
                    "pip install it (psycopg for PostgreSQL, PyMySQL for MySQL)"
                ) from e
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise FmnistError(f"hydra.sweeper.storage={hide_password(url)}: cannot open it ({first})") from e
            if self._lock is not None:
                _sqlite_wal(self.storage.engine)

    def job_spec(self) -> str:
        """The storage as a job reaches it: the URL, or `memory:<key>` for this process's memory study."""
        if self.url != "memory":
            return self.url
        key = f"{os.getpid()}-{id(self.storage)}"
        IN_PROCESS[key] = self.storage
        return f"memory:{key}"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        if self._advisory is not None:
            with self._advisory_lock():
                yield
        elif self._lock is None:
            yield
        else:
            self._lock.acquire()
            try:
                yield
            finally:
                self._lock.release()

    @contextlib.contextmanager
    def _advisory_lock(self) -> Iterator[None]:
        import sqlalchemy

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        key, text = self._lock_key, sqlalchemy.text
        with self._engine.connect() as conn:
            if self._advisory == "postgresql":
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


def open_storage(spec: str, study_name: str) -> Any:
    """A job's way into its sweeper's study: the storage `StudyStore.job_spec` named."""
    return StudyStore(spec, Path("."), study_name).storage


def _sqlite_wal(engine: Any) -> None:
    """Write-ahead log, synced at checkpoints: a trial's report each epoch costs a few ms instead of
    an fsync per commit, and readers (the pruner, other workers) do not block the writer. The file
    stays on one machine, as SQLite must (several machines share a journal file or a database)."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    engine.dispose()  # connections made before the listener get it when they reconnect
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")  # stored in the file: once per database


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


def counts_toward_total(trial: Any) -> bool:
    """Completed, pruned, running, or failed by its own outcome; lost trials (worker gone) do not count."""
    from optuna.trial import TrialState

    return trial.state != TrialState.FAIL or FAILURE in trial.user_attrs


def mark_lost(study: Any, here: Mapping[str, Any], grace: float, sweep_dir: Path) -> int:
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


def finish_trial(
    study: Any, trial: Any, value: float | None = None, failure: str | None = None, pruned: bool = False
) -> None:
    """Tell Optuna a trial's end: PRUNED (`pruned`: with its last reported value), COMPLETE with
    `value`, else FAIL (with `failure` when its outcome failed).

    `trial` is a Trial or a trial number. A trial another worker finished meanwhile (judged lost for
    want of a heartbeat) is left as it is.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        if pruned:
            study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            return
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
