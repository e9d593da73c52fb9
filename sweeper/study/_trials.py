"""A trial's life in the storage, wherever it runs: its heartbeat, and how it ends when its
job cannot tell (it failed before it could, or its process or machine is gone).

Optuna 5 keeps heartbeats for RDB storages only, and only inside ``study.optimize``; trials
here are asked and told across processes, so the heartbeat is ours, the same for every
storage: a trial system attribute with a timestamp, refreshed while the trial runs. A trial
without one for ``grace_period`` seconds, or whose job its launcher reports killed, is lost:
failed, marked, and retried once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from sweeper.study._mlflow import fail_trial_runs
from sweeper.tracking import Tracker

log = logging.getLogger("sweeper.study")

HEARTBEAT = "sweeper:heartbeat"  # trial system attr: time.time() of the last sign of life
LOST = "sweeper:lost"            # trial system attr: failed because its process is gone (True),
INTERRUPTED = "interrupted"      # ... or this value: the user interrupted it (Ctrl-C, SIGTERM)
PROGRESS = "sweeper:progress"    # trial system attr: {"epoch", "epochs", "val_acc", "training_s"}
OVERHEAD = "sweeper:overhead:"   # study system attr + trial number: the trial's overhead (s)
WORKER = "sweeper:worker"        # trial system attr: host:pid of the sweep that asked it
RESUMES = "resumes"              # trial user attr: the interrupted trial it runs again
RETRY_OF = "retry_of"            # trial user attr: the lost trial it retries (once)


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _beat(storage: BaseStorage, trial_id: int) -> bool:
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
        _beat(self._storage, trial_id)
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
                    if not _beat(self._storage, trial_id):
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


def mark_lost(storage: BaseStorage, trial: FrozenTrial, reason: str,
              run_id: str | None = None, interrupted: bool = False) -> bool:
    """FAIL a trial whose process is gone, or that the user ``interrupted``, with ``reason`` in
    its user attr ``error`` (and its MLflow run in ``mlflow_run_id``); False if someone else
    finished it first."""
    try:
        storage.set_trial_system_attr(trial._trial_id, LOST, INTERRUPTED if interrupted else True)
        storage.set_trial_user_attr(trial._trial_id, "error", reason)
        if run_id:
            storage.set_trial_user_attr(trial._trial_id, "mlflow_run_id", run_id)
        return bool(storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL))
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


def job_killed(error: BaseException | None) -> bool:
    """Whether a launcher's error says the job's process ended without a result, so that its
    trial is lost rather than failed: submitit (Slurm or local) raises UncompletedJobError for
    a job cancelled or killed. Matched by name, as submitit is an optional launcher."""
    return error is not None and type(error).__name__ == "UncompletedJobError"


def counts_toward_total(trial: FrozenTrial) -> bool:
    """Trials that use up the study's n_trials: all but queued ones and lost (retried) ones."""
    if trial.state == TrialState.WAITING:
        return False
    return not (trial.state == TrialState.FAIL and trial.system_attrs.get(LOST))


def fail(study: optuna.Study, storage: BaseStorage, trial_id: int, number: int, reason: str,
         tracker: Tracker, parent_run_id: str | None, overrides: Sequence[str] = ()) -> None:
    """End trial ``number`` FAIL with ``reason``, by its job or, when the job never got to
    tell, by the sweep: the reason in user attr ``error``, its MLflow run ended FAILED (made,
    with ``overrides``, if the trial had none yet) and linked, and the study told."""
    storage.set_trial_user_attr(trial_id, "error", reason[:2000])
    run_id = fail_trial_runs(tracker, parent_run_id, study.study_name, number, reason, overrides)
    if run_id:
        storage.set_trial_user_attr(trial_id, "mlflow_run_id", run_id)
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
