"""The Optuna sweeper in parallel: no barrier, launchers, several sweeps, a killed sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, TINY
from tests.test_study import OTHERS, STUDY, check_consistent, load_study, study_runs

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def sweep_cmd(outputs: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sweeper.run", "-m", *TINY, f"paths.outputs={outputs}", *args]


def start(outputs: Path, *args: str, log_name: str = "sweep",
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m sweeper.run -m TINY ARGS`` in the background (in ``env``, by default this
    process's), logging to ``<outputs>/../<log_name>.log``."""
    env = {**(env or os.environ), "HYDRA_FULL_ERROR": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(outputs.parent / f"{log_name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(sweep_cmd(outputs, *args), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, outputs: Path, log_name: str = "sweep",
           timeout: float = 400) -> None:
    rc = proc.wait(timeout=timeout)
    text = (outputs.parent / f"{log_name}.log").read_text()
    assert rc == 0, text[-4000:]


def test_the_journal_syncs_what_a_study_resumes_from_and_optuna_reads_it(tmp_path, monkeypatch):
    """The study's journal waits for the disk (fsync) after a study's or a trial's creation,
    parameters and end, and not after what only a running trial writes (reports, attributes):
    the next sync makes those durable with it. Optuna's own backend reads the file whole."""
    import json

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from sweeper.storage import open_storage

    path = tmp_path / "journal.log"
    synced: list[int] = []  # the op code of the journal's last line at each fsync
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(json.loads(path.read_text().splitlines()[-1])["op_code"])

    monkeypatch.setattr(os, "fsync", fsync)
    study = optuna.create_study(storage=open_storage(str(path)), study_name="s")
    study.set_user_attr("sampler", "depth")
    trial = study.ask()
    x = trial.suggest_float("x", 0.0, 1.0)
    for step in range(3):
        trial.report(0.1 * step, step)
    trial.set_user_attr("train_time_s", 1.5)
    study.tell(trial, 0.5)
    monkeypatch.undo()

    ops = [json.loads(line)["op_code"] for line in path.read_text().splitlines()]
    running = {7, 8, 9}  # a report, a trial's user or system attribute
    assert synced == [op for op in ops if op not in running]  # each of the others, at once
    assert ops[-1] not in running and ops.count(7) == 3  # ... the last one with the reports
    again = optuna.load_study(study_name="s",
                              storage=JournalStorage(JournalFileBackend(str(path))))
    (read,) = again.trials
    assert read.state == TrialState.COMPLETE and read.params == {"x": x} and read.value == 0.5
    assert read.intermediate_values == {0: 0.0, 1: 0.1, 2: 0.2}
    assert read.user_attrs == {"train_time_s": 1.5} and again.user_attrs == {"sampler": "depth"}


def test_no_barrier_with_joblib(outputs, mlflow_client):
    """n_jobs=2: while one long trial runs, the other worker runs all the short ones."""
    from sweeper.storage import open_storage

    study = optuna.create_study(study_name=STUDY, directions=["maximize", "minimize"],
                                storage=open_storage(str(outputs / "optuna" / "journal.log")))
    study.enqueue_trial({"trainer.epochs": 40})
    for _ in range(4):
        study.enqueue_trial({"trainer.epochs": 1})
    proc = start(outputs, "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2",
                 "hydra.sweeper.n_trials=5", "trainer.epochs=1,40", "freeze.unfrozen=9",
                 *OTHERS)
    finish(proc, outputs)
    trials = load_study(outputs).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    long, short = trials[0], trials[1:]
    assert long.params["trainer.epochs"] == 40
    for t in short:  # none waited for the long one
        assert long.datetime_start <= t.datetime_start and t.datetime_complete < long.datetime_complete
    check_consistent(load_study(outputs), mlflow_client)


def test_submitit_local_runs_trials_at_once(outputs, mlflow_client):
    proc = start(outputs, "hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2",
                 "hydra.sweeper.n_trials=3")
    finish(proc, outputs)
    study = load_study(outputs)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    a, b = trials[0], trials[1]
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
    check_consistent(study, mlflow_client)
    parent, children = study_runs(mlflow_client)
    assert len(children) == 3 and parent.info.status == "FINISHED"


def test_two_sweeps_share_the_journal(outputs, mlflow_client):
    procs = [start(outputs, "hydra.sweeper.n_trials=6", log_name=f"sweep{i}") for i in range(2)]
    for i, p in enumerate(procs):
        finish(p, outputs, f"sweep{i}")
    study = load_study(outputs)
    assert len(study.trials) == 6
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert len({t.system_attrs["sweeper:worker"] for t in study.trials}) == 2  # both worked
    # the default (depth) sampler plans around the other sweep's running trials: no repeat
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6
    parent, children = study_runs(mlflow_client)  # exactly one parent
    assert len(children) == 6 and parent.info.status == "FINISHED"
    check_consistent(study, mlflow_client)


def test_kill_9_then_resume(outputs, mlflow_client):
    args = ("hydra.sweeper.n_trials=3", "trainer.epochs=24", "freeze.unfrozen=9",
            "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3",
            "hydra/sweeper/pruner=none")
    proc = start(outputs, *args, log_name="killed")
    deadline = time.time() + 300
    victim = None
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        try:
            trials = load_study(outputs).trials
        except Exception:  # noqa: BLE001 - the study is not there yet
            continue
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        # training (its first epoch reported: progress is written at most once a second)
        running = [t for t in trials if t.state == TrialState.RUNNING
                   and (t.system_attrs.get("sweeper:progress") or {}).get("epoch", 0) >= 1]
        if done and running:
            victim = running[0].number
    assert victim is not None, (outputs.parent / "killed.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_study(outputs).trials[victim].state == TrialState.RUNNING  # left behind

    finish(start(outputs, *args, log_name="resumed"), outputs, "resumed")
    study = load_study(outputs)
    lost = study.trials[victim]
    assert lost.state == TrialState.FAIL and lost.system_attrs["sweeper:lost"]
    assert "no heartbeat" in lost.user_attrs["error"]
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == victim]
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 3
    check_consistent(study, mlflow_client)  # nothing RUNNING; one FINISHED run per COMPLETE
    parent, children = study_runs(mlflow_client)
    assert parent.info.status == "FINISHED"
    (lost_run,) = [r for r in children if r.data.tags["optuna.trial_number"] == str(victim)]
    assert lost_run.info.status == "FAILED" and "no heartbeat" in lost_run.data.tags["error"]
