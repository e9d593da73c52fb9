"""Optuna plumbing: storages, the study lock, samplers and pruners from config, heartbeats.

Storage is a journal file (many processes on one machine) or an RDB URL (many machines).
Optuna 5 keeps heartbeats for RDB storages only, and only inside ``study.optimize``; trials
here are asked and told across processes, so the heartbeat is ours, the same for every
storage: a trial system attribute with a timestamp, refreshed while the trial runs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from sweeper.errors import UserError

log = logging.getLogger(__name__)
# TPE's group, QMC and metric names have been "experimental" since Optuna 2-3; we rely on them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HEARTBEAT = "sweeper:heartbeat"  # trial system attr: time.time() of the last sign of life
LOST = "sweeper:lost"            # trial system attr: failed because its heartbeat stopped
PROGRESS = "sweeper:progress"    # trial system attr: "epoch/epochs val_acc"
WORKER = "sweeper:worker"        # trial system attr: host:pid of the sweep that asked it


def is_url(storage: str) -> bool:
    return "://" in storage


def journal_path(storage: str) -> Path:
    return Path(storage).expanduser().resolve()


def storage_label(storage: str) -> str:
    """``storage`` fit to show and log: an absolute journal path, or a URL without password."""
    if not is_url(storage):
        return str(journal_path(storage))
    from sqlalchemy.engine import make_url

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: show the scheme only
        return storage.split("://", 1)[0] + "://..."


def rdb_url(storage: str) -> str:
    """``storage`` with a driver SQLAlchemy can load: SQLAlchemy 2.1 reads a bare
    ``postgresql://`` as psycopg 3; use psycopg2 when only that one is installed."""
    import importlib.util

    if (storage.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None
            and importlib.util.find_spec("psycopg2") is not None):
        return "postgresql+psycopg2://" + storage[len("postgresql://"):]
    return storage


def open_storage(storage: str) -> BaseStorage:
    """The Optuna storage for ``storage``: an RDB URL, or else a journal file path."""
    if is_url(storage):
        storage = rdb_url(storage)
        if storage.startswith("sqlite:"):
            log.warning("SQLite is not safe for parallel writers (Optuna FAQ): use the default "
                        "journal file on one machine, PostgreSQL for several.")
        try:
            return RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
        except Exception as e:  # noqa: BLE001 - driver or connection errors, told plainly
            raise UserError(f"Cannot open Optuna storage {storage_label(storage)}: {e}") from None
    path = journal_path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


class StudyLock:
    """Mutual exclusion over one study across threads, processes and machines.

    Counting the study's trials and asking for a new one happen under it, so that n_trials
    is the study's total even with several sweeps; so does creating the MLflow parent run.
    A journal file (or SQLite) uses a lock file beside it; PostgreSQL an advisory lock.
    """

    def __init__(self, storage: str, study_name: str) -> None:
        self._thread_lock = threading.RLock()
        self._file_lock = None
        self._engine = None
        self._key = zlib.crc32(study_name.encode()) & 0x7FFFFFFF
        if not is_url(storage):
            from filelock import FileLock

            # Not "<journal>.lock": that is Optuna's own lock for writing the journal.
            self._file_lock = FileLock(str(journal_path(storage)) + ".sweeper.lock")
        elif storage.startswith("sqlite:///"):
            from filelock import FileLock

            self._file_lock = FileLock(storage[len("sqlite:///"):] + ".sweeper.lock")
        elif storage.startswith("postgresql"):
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(rdb_url(storage),
                                                    poolclass=sqlalchemy.pool.NullPool)
        else:
            log.warning("No cross-process lock for %s: several sweeps on this study may run a "
                        "few trials past n_trials.", storage_label(storage))

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._thread_lock:
            if self._file_lock is not None:
                with self._file_lock:
                    yield
            elif self._engine is not None:
                import sqlalchemy

                with self._engine.connect() as conn:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
                    try:
                        yield
                    finally:
                        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"),
                                     {"k": self._key})
            else:
                yield


def make_sampler(cfg: DictConfig | None, *, seed_offset: int = 0,
                 grid: Mapping[str, list[Any]] | None = None) -> optuna.samplers.BaseSampler:
    """The sampler of ``hydra.sweeper.sampler`` (``_target_`` and its arguments)."""
    if cfg is None:
        return optuna.samplers.TPESampler()
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    target = str(kwargs.pop("_target_"))
    if kwargs.get("seed") is not None:
        kwargs["seed"] = int(kwargs["seed"]) + seed_offset
    if target.endswith("GridSampler"):
        kwargs["search_space"] = dict(grid or {})
    try:
        return instantiate({"_target_": target, **kwargs}, _convert_="all")
    except Exception as e:  # noqa: BLE001 - unknown class or argument: the user's config
        raise UserError(f"hydra.sweeper.sampler ({target}) cannot be built: {e}") from None


def make_pruner(cfg: DictConfig | None) -> optuna.pruners.BasePruner:
    """The pruner of ``hydra.sweeper.pruner``; no pruning when it is null."""
    if cfg is None or cfg.get("_target_") is None:
        return optuna.pruners.NopPruner()
    try:
        return instantiate(cfg, _convert_="all")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"hydra.sweeper.pruner cannot be built: {e}") from None


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def beat(storage: BaseStorage, trial_id: int) -> bool:
    """Record a sign of life for a running trial; False once the trial is finished."""
    try:
        storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        return True
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


class Heartbeat:
    """A daemon thread refreshing the heartbeat of a set of running trials every ``interval`` s."""

    def __init__(self, storage: BaseStorage, interval: float) -> None:
        self._storage = storage
        self._interval = interval
        self._trials: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self._thread.start()

    def add(self, trial_id: int) -> None:
        beat(self._storage, trial_id)
        with self._lock:
            self._trials.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self._trials.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                trials = list(self._trials)
            for trial_id in trials:
                try:
                    if not beat(self._storage, trial_id):
                        self.remove(trial_id)
                except Exception as e:  # noqa: BLE001 - a storage hiccup must not kill the beat
                    log.warning("heartbeat of trial id %s not recorded: %s", trial_id, e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def last_sign_of_life(trial: FrozenTrial) -> float:
    hb = trial.system_attrs.get(HEARTBEAT)
    start = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(float(hb), start) if hb is not None else start


def stale_trials(study: optuna.Study, grace_period: float) -> list[FrozenTrial]:
    """RUNNING trials without a sign of life for more than ``grace_period`` seconds."""
    now = time.time()
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if now - last_sign_of_life(t) > grace_period]


def mark_lost(storage: BaseStorage, trial: FrozenTrial, reason: str) -> bool:
    """FAIL a trial whose process is gone, with ``reason`` in its user attr ``error``;
    False if someone else finished it first."""
    try:
        storage.set_trial_system_attr(trial._trial_id, LOST, True)
        storage.set_trial_user_attr(trial._trial_id, "error", reason)
        return bool(storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL))
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


def counts_toward_total(trial: FrozenTrial) -> bool:
    """Trials that use up the study's n_trials: all but queued ones and lost (retried) ones."""
    if trial.state == TrialState.WAITING:
        return False
    return not (trial.state == TrialState.FAIL and trial.system_attrs.get(LOST))
