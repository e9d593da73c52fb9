"""Several machines for real: a study whose trials are Slurm jobs, its Optuna study in
PostgreSQL and its runs on an MLflow tracking server.

A one-node Slurm cluster (munged, slurmdbd on MariaDB, slurmctld, slurmd), PostgreSQL and
``mlflow server`` are started here from the Debian packages that setup.sh installs, on ports
picked at run time, and stopped at the end whether the tests pass or not. Two sweep processes
(as if on two login nodes) share a study through ``hydra/launcher=slurm``; a job cancelled
mid-trial is failed and retried, as a killed sweep's trial is.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper.storage import rdb_url
from tests import servers
from tests.conftest import ROOT
from tests.test_study import STUDY, check_consistent, study_runs
from tests.test_study_parallel import finish, start

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

N_TRIALS = 4


@dataclass
class Site:
    """The services the machines of a study share, and the file system they all see."""

    slurm: servers.SlurmCluster
    storage: str                 # the Optuna study's PostgreSQL URL
    mlflow: servers.MlflowServer
    outputs: Path                # paths.outputs, on the file system shared with the nodes

    def overrides(self) -> list[str]:
        """What a user adds to a sweep's command to run it on this site (README)."""
        return ["hydra/launcher=slurm", f"hydra.launcher.partition={self.slurm.partition}",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                "hydra.launcher.timeout_min=10",
                f"hydra.sweeper.storage='{self.storage}'",
                "tracking=server", f"tracking.uri={self.mlflow.url}"]

    @cached_property
    def optuna_storage(self) -> optuna.storages.RDBStorage:
        """One connection pool for all the test's reads (it creates Optuna's tables if the
        database has none yet)."""
        return optuna.storages.RDBStorage(rdb_url(self.storage))

    def study(self, name: str = STUDY) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=self.optuna_storage)

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.mlflow.url)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    for problem in (servers.slurm_missing(), servers.postgres_missing()):
        if problem:
            pytest.skip(problem)
    base = tmp_path_factory.mktemp("cluster")
    with ExitStack() as stack:
        slurm = stack.enter_context(servers.slurm_cluster(base / "slurm"))
        storage = stack.enter_context(servers.postgres())
        mlflow = stack.enter_context(servers.mlflow_server(base / "mlflow"))
        outputs = base / "shared" / "outputs"
        outputs.mkdir(parents=True)
        yield Site(slurm, storage, mlflow, outputs)


@pytest.fixture
def sweep(site) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start ``python -m sweeper.run -m`` on the site; whatever still runs at the end is
    killed."""
    started: list[subprocess.Popen] = []

    def run(log_name: str, *args: str) -> subprocess.Popen:
        proc = start(site.outputs, *site.overrides(), *args, log_name=log_name,
                     env=site.slurm.env)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    site.slurm.cancel_all()  # and their jobs, so that the next test has the node to itself


@pytest.mark.cluster
def test_two_login_nodes_share_a_study_on_slurm(site, sweep, tmp_path):
    t0 = time.time()
    procs = [sweep(f"login{i}", f"hydra.sweeper.n_trials={N_TRIALS}", "hydra.sweeper.n_jobs=2")
             for i in range(2)]
    for i, proc in enumerate(procs):
        finish(proc, site.outputs, f"login{i}")
    wall = time.time() - t0

    study = site.study()
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * N_TRIALS
    assert len({t.system_attrs["sweeper:worker"] for t in study.trials}) == 2  # both worked
    client = site.client()
    check_consistent(study, client)  # one FINISHED run per trial, nothing RUNNING
    parent, children = study_runs(client)
    assert parent.info.status == "FINISHED" and len(children) == N_TRIALS

    # Each trial was a Slurm job of its own, tagged on its run, COMPLETED in Slurm's books.
    jobs = [r.data.tags["slurm.job_id"] for r in children]
    assert len(set(jobs)) == N_TRIALS
    assert set(site.slurm.accounting(*jobs).values()) == {"COMPLETED"}

    # Artifacts went through the server to its folder, and read back through it.
    assert not (site.outputs / "mlartifacts").exists()
    for run in children:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
        cfg = yaml.safe_load(Path(local).read_text())
        assert cfg["freeze"]["unfrozen"] == int(run.data.params["freeze.unfrozen"])
        assert list(site.mlflow.artifacts.rglob(f"{run.info.run_id}/artifacts/config.yaml"))

    # The study's report, made from the server's runs by the sweep that finished it...
    md = Path(client.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path)))
    assert "Recommendation" in md.read_text()
    # ...and again by `python -m sweeper.report` on a machine that has only the servers.
    elsewhere = tmp_path / "elsewhere"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run([sys.executable, "-m", "sweeper.report", f"study={STUDY}",
                        "tracking=server", f"tracking.uri={site.mlflow.url}",
                        f"storage='{site.storage}'", f"paths.outputs={elsewhere}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Recommendation" in r.stdout
    with open(elsewhere / "studies" / STUDY / "report" / "depths.csv") as f:
        assert sum(int(row["trials"]) for row in csv.DictReader(f)) == N_TRIALS
    print(_summary(wall, site.slurm.job_times(*jobs)))


def _summary(wall: float, times: dict[str, dict[str, str]]) -> str:
    """The numbers the README quotes: wall time, jobs, their time in the queue and running."""
    from datetime import datetime

    t = {j: {k: datetime.fromisoformat(v) for k, v in row.items() if k != "Elapsed"}
         for j, row in times.items()}
    waits = [(r["Start"] - r["Submit"]).total_seconds() for r in t.values()]
    runs = [(r["End"] - r["Start"]).total_seconds() for r in t.values()]
    most = max(sum(r["Start"] <= s["Start"] < r["End"] for r in t.values()) for s in t.values())
    return (f"\n{N_TRIALS} trials, {len(t)} Slurm jobs (at most {most} running at once), "
            f"2 sweeps: {wall:.1f} s wall; jobs queued {min(waits):.0f}-{max(waits):.0f} s, "
            f"ran {min(runs):.0f}-{max(runs):.0f} s each")


@pytest.mark.cluster
def test_a_job_cancelled_mid_trial_is_failed_and_retried(site, sweep):
    name = "scancel"
    engine = sqlalchemy.create_engine(rdb_url(site.storage), poolclass=sqlalchemy.pool.NullPool)
    site.optuna_storage  # noqa: B018 - Optuna's tables exist before the sweep and we poll them
    proc = sweep(name, f"hydra.sweeper.study_name={name}", "hydra.sweeper.n_trials=1",
                 "trainer.epochs=3", "freeze.unfrozen=9")
    log = site.outputs.parent / f"{name}.log"

    def until(what: str, ready: Callable[[], object]) -> object:
        deadline = time.time() + 300
        while not (found := ready()):
            assert time.time() < deadline and proc.poll() is None, \
                f"waiting for {what}:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        return found

    def running_trial() -> optuna.trial.FrozenTrial | None:
        try:
            trials = site.study(name).trials
        except KeyError:  # the study is not there yet
            return None
        return trials[0] if trials and trials[0].state == TrialState.RUNNING else None

    def training_run():  # the trial's MLflow run, once it has its model (training is next)
        # Not an epoch's metrics: a trial writes MLflow in batches (at most one a second), so
        # epoch 1's metrics may still be buffered when its progress report waits on the held
        # row. What the trial is (its parameter counts) is written before training starts.
        exp = site.client().get_experiment_by_name("sweeper")
        runs = site.client().search_runs([exp.experiment_id], "tags.`optuna.study_name` = "
                                         f"'{name}' and tags.`sweeper.kind` = 'trial'")
        return runs[0] if runs and "trainable_params" in runs[0].data.metrics else None

    trial = until("trial 0", running_trial)
    (job,) = until("its Slurm job to run", lambda: [j for j, state in site.slurm.jobs().items()
                                                     if state == "RUNNING"])
    # submitit ignores scancel's SIGTERM, so a cancelled job lives on until Slurm's SIGKILL
    # (5 s or more later), time enough for a fast trial to finish. To cancel it mid-trial
    # whatever this machine's speed, hold the trial's row in PostgreSQL (as a busy database
    # would): the job still trains and logs to MLflow, but its first new Optuna record (epoch
    # 1's progress) waits on the row, and so would its result, until Slurm has killed it.
    with engine.connect() as conn, conn.begin():
        conn.execute(sqlalchemy.text("SELECT 1 FROM trials WHERE trial_id = :id FOR UPDATE"),
                     {"id": trial._trial_id})
        assert "sweeper:progress" not in site.study(name).trials[0].system_attrs, \
            "the job reached epoch 1 before the test could hold its trial"
        run = until("the trial to start training", training_run)
        assert run.data.tags["slurm.job_id"] == job  # the run names its job
        site.slurm.run("scancel", job)
        until("the cancelled job to end", lambda: job not in site.slurm.jobs())
    finish(proc, site.outputs, name)

    study = site.study(name)
    lost, retry = study.trials
    assert lost.state == TrialState.FAIL and lost.system_attrs["sweeper:lost"]
    assert "killed" in lost.user_attrs["error"] and "CANCELLED" in lost.user_attrs["error"]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == lost.number
    assert retry.params == lost.params
    client = site.client()
    check_consistent(study, client)  # the cancelled trial's run FAILED, nothing RUNNING
    parent, children = study_runs(client, name)
    assert parent.info.status == "FINISHED"
    (lost_run,) = [r for r in children if r.data.tags["optuna.trial_number"] == "0"]
    assert lost_run.info.run_id == run.info.run_id
    assert lost_run.info.status == "FAILED" and "CANCELLED" in lost_run.data.tags["error"]
    (retry_run,) = [r for r in children if r.data.tags["optuna.trial_number"] == "1"]
    retry_job = retry_run.data.tags["slurm.job_id"]
    states = site.slurm.accounting(job, retry_job)
    assert states[job].startswith("CANCELLED") and states[retry_job] == "COMPLETED"


def test_slurm_ids_are_tagged(monkeypatch):
    """A run made inside a Slurm job (an array task too) names its job."""
    from sweeper.tracking import environment_tags

    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert not [k for k in environment_tags() if k.startswith("slurm.")]
    monkeypatch.setenv("SLURM_JOB_ID", "1235")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1230")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    tags = environment_tags()
    assert (tags["slurm.job_id"], tags["slurm.array_job_id"], tags["slurm.array_task_id"]) \
        == ("1235", "1230", "5")


def test_slurm_launcher_settings(outputs):
    """hydra/launcher=slurm: submitit's Slurm launcher with the documented defaults."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True, overrides=[
            f"paths.outputs={outputs}", "hydra/launcher=slurm", "hydra.launcher.gpus_per_task=1",
            "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_task) == ("gpu", 1)
    assert (launcher.timeout_min, launcher.cpus_per_task, launcher.mem_gb,
            launcher.array_parallelism) == (60, 4, 16, 16)
    assert launcher.submitit_folder.endswith("/.submitit/%j")
