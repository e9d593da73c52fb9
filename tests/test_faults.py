"""Bad data, storage, paths, a full disk, sweeps started at once, Ctrl-C: each ends with one
clear message and a non-zero exit (nothing already recorded lost), or works as described."""

from __future__ import annotations

import errno
import io
import logging
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from sweeper.errors import UserError
from tests.conftest import ROOT, TINY
from tests.test_cli_errors import _fails_cleanly
from tests.test_study import STUDY, check_consistent, load_study, study_runs

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _images(root: Path, classes: dict[str, int], bad: str | None = None) -> Path:
    from PIL import Image

    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (12, 12), (40 * i % 255, 80, 120)).save(root / name / f"{i}.png")
    if bad:
        (root / bad).write_bytes(b"\xff\xd8 not really a jpeg")
    return root


FOLDER = ["dataset=image_folder", "dataset.image_size=32", "dataset.train_per_class=3",
          "dataset.val_per_class=2", "dataset.test_per_class=null"]


def test_unreadable_images_skipped_are_counted_on_the_run(make_cfg, tmp_path, mlflow_client):
    from sweeper.trial import run_trial

    root = _images(tmp_path / "imgs", {"a": 7, "b": 7}, bad="a/broken.jpg")
    result = run_trial(make_cfg(*FOLDER, f"dataset.root={root}"))
    run = mlflow_client.get_run(result["run_id"])
    assert run.data.metrics["skipped_images"] == 1
    listed = Path(run.info.artifact_uri.removeprefix("file://")) / "skipped_images.txt"
    assert "broken.jpg" in listed.read_text()


def test_bad_data_from_the_command_line(cli, tmp_path, mlflow_client):
    root = _images(tmp_path / "imgs", {"a": 7, "b": 7}, bad="a/broken.jpg")
    _fails_cleanly(cli(*FOLDER, f"dataset.root={root}", "dataset.on_bad_image=fail"),
                   "Cannot read image", "broken.jpg")
    one = _images(tmp_path / "one", {"only": 9})
    _fails_cleanly(cli(*FOLDER, f"dataset.root={one}"), "a classifier needs at least two")


def test_a_corrupt_mlflow_store_is_named_and_kept(cli, outputs):
    store = outputs / "mlflow.db"
    store.write_bytes(b"this is not a database" * 100)
    done = cli()
    _fails_cleanly(done, f"{store} is not a readable MLflow store", f"mv {store} {store}.bad")
    assert store.read_bytes() == b"this is not a database" * 100


def test_an_outputs_path_that_cannot_be_created(cli, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")
    done = cli(f"paths.outputs={file}/outputs")
    _fails_cleanly(done, f"{file} is a file, not a folder")


def test_an_unreachable_database_is_one_message(cli, outputs):
    done = cli("hydra.sweeper.storage=postgresql://sweeper:secret@127.0.0.1:9/nope",
               flags=("-m",))
    _fails_cleanly(done, "cannot open the Optuna storage", "Connection refused")
    assert "secret" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr


def test_a_full_disk_while_writing_a_cache_entry(make_cfg, outputs, mlflow_client, monkeypatch):
    from sweeper.trial import run_trial

    real = os.replace

    def full(src, dst):
        if str(dst).endswith(".feat"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(UserError, match=r"Cannot write the feature cache entry .*: the disk is "
                                        r"full\. Nothing already recorded was lost; .*paths.cache="):
        run_trial(make_cfg("freeze.unfrozen=2"))
    assert not [p for p in (outputs / "cache").rglob("*") if ".tmp" in p.name]
    (run,) = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("sweeper").experiment_id])
    assert run.info.status == "FAILED" and "disk is full" in run.data.tags["error"]
    assert run.data.params["freeze.unfrozen"] == "2"  # what was recorded stays


def test_a_full_disk_while_writing_a_checkpoint(make_cfg, outputs, mlflow_client, monkeypatch):
    from sweeper.trial import run_trial

    real = Path.write_bytes

    def full(self, data):
        if self.parent == outputs / "pretrained":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError, match=r"Cannot write the source checkpoint .*: the disk is full"):
        run_trial(make_cfg("backbone.weights=source", "source.dataset.train_per_class=4",
                           "source.dataset.val_per_class=2", "source.dataset.test_per_class=2",
                           "source.trainer.epochs=1"))
    assert [p.suffix for p in (outputs / "pretrained").iterdir()] == [".lock"]  # no partial file
    exp = mlflow_client.get_experiment_by_name("sweeper").experiment_id
    (pretrain,) = mlflow_client.search_runs([exp], "tags.`sweeper.kind` = 'pretrain'")
    assert pretrain.info.status == "FAILED" and "disk is full" in pretrain.data.tags["error"]


def test_an_unreadable_weights_file_does_not_suggest_unsafe_loading(tmp_path):
    import datetime

    from sweeper.model import from_file

    path = tmp_path / "w.pt"
    torch.save({"layer": datetime.datetime.now()}, path)  # a Python object: no tensors
    with pytest.raises(UserError) as e:
        from_file(path)
    assert "holds Python objects, not only tensors" in str(e.value)
    assert "weights_only" not in str(e.value)


# --- several sweeps at once on a new folder ---------------------------------------------

def _open_store(uri: str, barrier, results) -> None:
    from sweeper.tracking import open_store

    barrier.wait()  # every process creates the new store at the same instant
    try:
        open_store(uri)
        results.put("ok")
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put(f"{type(e).__name__}: {e}")


def test_processes_opening_a_new_store_at_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [ctx.Process(target=_open_store, args=(uri, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [results.get(timeout=5) for _ in procs] == ["ok"] * 4


def _sweep_cmd(outputs: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sweeper.run", "-m", *TINY, f"paths.outputs={outputs}",
            *overrides]


def _env() -> dict[str, str]:
    env = {**os.environ, "HYDRA_FULL_ERROR": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_sweeps_started_at_once_on_a_new_folder_share_the_study(outputs, mlflow_client):
    cmd = _sweep_cmd(outputs, "hydra.sweeper.n_trials=3")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    study = load_study(outputs)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    parent, children = study_runs(mlflow_client)  # one parent run, shared
    assert len(children) == 3
    check_consistent(study, mlflow_client)


# --- Ctrl-C ----------------------------------------------------------------------------------

def _in_training(mlflow_client, kind: str = "trial", metric: str = "trainable_params") -> bool:
    """Whether a RUNNING run of ``kind`` has logged ``metric`` (a trial: its model is built, and
    it ends KILLED from here on)."""
    if not Path(mlflow_client.tracking_uri.removeprefix("sqlite:///")).exists():
        return False
    exp = mlflow_client.get_experiment_by_name("sweeper")
    if exp is None:
        return False
    runs = mlflow_client.search_runs([exp.experiment_id],
                                     f"tags.`sweeper.kind` = '{kind}' and "
                                     "attributes.status = 'RUNNING'")
    return any(metric in r.data.metrics for r in runs)


def _wait_for_a_trial(mlflow_client, proc: subprocess.Popen, timeout: float = 600,
                      **what) -> None:
    """Until a trial's run is inside its training steps; with ``kind`` and ``metric``: until
    a run of that kind has logged that metric (:func:`_in_training`)."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if _in_training(mlflow_client, **what):
            return
        time.sleep(0.1)
    pytest.fail("no trial got as far as its model")


def _stopped(cmd: list[str], mlflow_client, sig: int = signal.SIGINT,
             **what) -> tuple[int, str, str]:
    """``cmd`` started, sent ``sig`` while a run is inside its training (``what``: as
    :func:`_wait_for_a_trial`), and its exit status, stdout and stderr.

    The process is held still (SIGSTOP) while the store is asked again whether that run is
    still inside its training, and ``sig`` is sent only then: on a busy machine the first
    answer can be stale by the time the signal goes, after a short trial, or the whole study,
    has ended. (The studies that CI saw exit 0 after their signal had lost it in the journal's
    lock: :class:`sweeper.storage.Journal`, fixed there.) Ctrl-C is sent as a terminal
    sends it to a program in the foreground: with SIGINT's default action, even where this
    test runs in a background job that ignores it."""
    def sigint_default() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    while True:
        _wait_for_a_trial(mlflow_client, proc, **what)
        proc.send_signal(signal.SIGSTOP)
        try:
            inside = _in_training(mlflow_client, **what)
        except Exception:  # noqa: BLE001 - the store locked by the held process: ask again
            inside = False
        if inside:
            proc.send_signal(sig)  # delivered where the process stands, once it goes on
        proc.send_signal(signal.SIGCONT)
        if inside:
            break
        time.sleep(0.1)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_a_trace_that_ctrl_c_causes_in_the_mlflow_store_goes_to_the_log_file_only(tmp_path):
    """Ctrl-C in the middle of a query of the MLflow store: SQLAlchemy drops the connection,
    cannot close its cursor, and logs that at ERROR with a trace, through its pool's logger
    (as ``Connection._safe_close_cursor`` does). The console keeps to the one line that says
    what was kept; the job's log file keeps the trace; an error of the store that no interrupt
    caused still shows."""
    import sqlalchemy

    import sweeper.tracking  # noqa: F401 - a command's loggers, as it has them

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'mlflow.db'}")
    console, log_file = io.StringIO(), tmp_path / "job.log"
    handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            try:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            except sqlite3.ProgrammingError:
                engine.pool.logger.error("Error closing cursor", exc_info=True)
        assert console.getvalue() == ""
        try:
            raise sqlite3.OperationalError("disk I/O error")
        except sqlite3.OperationalError:
            engine.pool.logger.error("Exception during reset or similar", exc_info=True)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    assert "Exception during reset" in console.getvalue() and "disk I/O" in console.getvalue()
    assert "Error closing cursor" not in console.getvalue()
    logged = log_file.read_text()
    assert "Error closing cursor" in logged and "KeyboardInterrupt" in logged


def test_ctrl_c_says_the_study_is_resumable_and_the_resume_is_clean(cli, outputs, mlflow_client):
    # 40 epochs: a trial trains for seconds, so that Ctrl-C, sent once its run has logged its
    # first metrics, lands inside it (at 5 epochs it sometimes landed after the trial's end)
    overrides = ("hydra.sweeper.n_trials=2", "trainer.epochs=40")
    rc, out, err = _stopped(_sweep_cmd(outputs, *overrides), mlflow_client)
    assert rc == 130, (out + err)[-3000:]
    assert "Traceback" not in err + out, err[-3000:]
    assert f"Interrupted: study '{STUDY}' is resumable" in err.strip().splitlines()[-1]
    assert "run the same command again to resume it" in err

    study = load_study(outputs)
    (killed,) = [t for t in study.trials if t.state == TrialState.FAIL]
    run = mlflow_client.get_run(killed.user_attrs["mlflow_run_id"])  # the failed trial links it
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["error"]

    # Interrupted again, while it runs the interrupted trial (it runs first) or the next one:
    # whichever it was runs again too, not only once
    rc, out, err = _stopped(_sweep_cmd(outputs, *overrides), mlflow_client)
    assert rc == 130, (out + err)[-3000:]
    study = load_study(outputs)
    assert study.trials[killed.number + 1].user_attrs["resumes"] == killed.number
    (killed2,) = [t for t in study.trials
                  if t.state == TrialState.FAIL and t.number != killed.number]
    assert f"trial {killed2.number} will run again" in out + err, (out + err)[-3000:]

    done = cli(*overrides, flags=("-m",))  # the same command resumes it
    assert done.returncode == 0, done.stderr[-3000:]
    # the progress line counts them as interrupted, not as lost
    said = done.stdout + done.stderr
    assert "2 interrupted (run again)" in said and " lost" not in said, said[-3000:]
    study = load_study(outputs)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2
    assert any(t.user_attrs.get("resumes") == killed2.number and t.params == killed2.params
               for t in complete)
    assert any(t.params == killed.params for t in complete)
    parent, _ = study_runs(mlflow_client)
    assert parent.info.status == "FINISHED"
    assert "error" not in parent.data.tags  # no stale "interrupted" on the finished study
    check_consistent(study, mlflow_client)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_in_one_trial_is_one_line_and_its_run_ends_killed(sig, outputs,
                                                                             mlflow_client):
    # SIGTERM: kill, timeout, a scheduler's cancel or time limit; the run must not stay RUNNING
    cmd = [sys.executable, "-m", "sweeper.run", *TINY, f"paths.outputs={outputs}",
           "trainer.epochs=200"]
    rc, out, err = _stopped(cmd, mlflow_client, sig)
    assert rc == 128 + sig, (out + err)[-3000:]
    assert "Traceback" not in err + out, err[-3000:]
    assert "ended KILLED; run the same command again" in err.strip().splitlines()[-1]
    exp = mlflow_client.get_experiment_by_name("sweeper")
    runs = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'trial'")
    assert [r.info.status for r in runs] == ["KILLED"]
    reason = "interrupted (SIGTERM)" if sig == signal.SIGTERM else "interrupted (Ctrl-C)"
    assert runs[0].data.tags["error"] == reason


def test_sigterm_during_source_pretraining_ends_its_run_killed(outputs, mlflow_client):
    cmd = [sys.executable, "-m", "sweeper.run", *TINY, f"paths.outputs={outputs}",
           "backbone.weights=source", "source.dataset.train_per_class=40",
           "source.dataset.val_per_class=2", "source.dataset.test_per_class=2",
           "source.trainer.epochs=500", "source.trainer.batch_size=8"]
    rc, out, err = _stopped(cmd, mlflow_client, signal.SIGTERM, kind="pretrain", metric="val_acc")
    assert rc == 143, (out + err)[-3000:]
    assert "Traceback" not in err + out, err[-3000:]
    exp = mlflow_client.get_experiment_by_name("sweeper").experiment_id
    runs = {r.data.tags["sweeper.kind"]: r for r in mlflow_client.search_runs([exp])}
    assert {kind: r.info.status for kind, r in runs.items()} == {"pretrain": "KILLED",
                                                                 "trial": "KILLED"}
    assert runs["pretrain"].data.tags["error"] == "interrupted (SIGTERM)"
    assert [p.suffix for p in (outputs / "pretrained").iterdir()] == [".lock"]  # no partial file


def test_sigterm_stops_a_study_as_ctrl_c_does_nothing_left_running(outputs, mlflow_client):
    rc, out, err = _stopped(_sweep_cmd(outputs, "hydra.sweeper.n_trials=2", "trainer.epochs=200"),
                            mlflow_client, signal.SIGTERM)
    assert rc == 143, (out + err)[-3000:]
    assert "Traceback" not in err + out, err[-3000:]
    assert f"Interrupted: study '{STUDY}' is resumable" in err.strip().splitlines()[-1]
    parent, children = study_runs(mlflow_client)
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in children] == ["KILLED"]
    assert children[0].data.tags["error"] == "interrupted (SIGTERM)"
    study = load_study(outputs)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states  # run again


def test_ctrl_c_in_the_journal_lock_is_ctrl_c_and_leaves_the_lock_free(tmp_path, monkeypatch):
    """A signal that lands in the study journal's lock, just before its release renames the
    link away: the command still stops as Ctrl-C (Optuna's own release turned it into a
    FileNotFoundError, which failed the trial and let the study go on), and the next write
    finds the lock free instead of waiting out its grace period."""
    import optuna

    from sweeper.storage import open_storage

    storage = open_storage(str(tmp_path / "journal.log"))
    rename, signalled = os.rename, []

    def signal_first(src, dst):
        if not signalled:
            signalled.append(dst)
            raise KeyboardInterrupt
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", signal_first)
    with pytest.raises(KeyboardInterrupt):
        optuna.create_study(storage=storage, study_name="interrupted")
    monkeypatch.undo()
    assert signalled and not os.path.lexists(tmp_path / "journal.log.lock")
    optuna.create_study(storage=storage, study_name="next")


def test_an_interrupt_that_clean_up_code_replaced_still_ends_the_trial_killed(make_cfg,
                                                                            mlflow_client):
    """A library's clean-up that fails while Ctrl-C passes through it raises its own error
    in the interrupt's place: the trial is still interrupted (KILLED, to run again), not
    failed."""
    from sweeper.trial import run_trial

    def on_epoch(stats):
        try:
            raise KeyboardInterrupt
        finally:
            Path("/nonexistent/lock.rename").unlink()  # FileNotFoundError, the interrupt its context

    with pytest.raises(KeyboardInterrupt, match="ended KILLED; run the same command again"):
        run_trial(make_cfg(), on_epoch=on_epoch)
    exp = mlflow_client.get_experiment_by_name("sweeper")
    runs = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'trial'")
    assert [r.info.status for r in runs] == ["KILLED"]
    assert runs[0].data.tags["error"].startswith("interrupted")


def test_a_failed_trial_is_one_line_on_the_console_its_trace_in_the_job_log(cli, outputs):
    # At a depth with backbone units: the default study starts head-only, which one epoch at
    # this rate on fake data need not break.
    done = cli("hydra.sweeper.n_trials=1", "optim.lr_head=1e12", "optim.lr_backbone=1e12",
               "freeze.unfrozen=9", "hydra.sweeper.max_failure_rate=1.0", flags=("-m",))
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "trial 0 failed: TrainingDiverged" in console
    assert "Traceback" not in console
    logs = list((outputs / "multirun").rglob("*.log"))
    assert any("Traceback" in p.read_text() for p in logs), logs
