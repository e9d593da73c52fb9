"""Two sweeps share one study on a real PostgreSQL server, started here on 127.0.0.1."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.storage import rdb_url
from tests.test_study import STUDY, check_consistent, study_runs
from tests.test_study_parallel import finish, start

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL server (trust auth, 127.0.0.1 only) and an empty database."""
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    root = os.geteuid() == 0
    if root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as 'postgres'")
    as_user = ["runuser", "-u", "postgres", "--"] if root else []
    base = Path(tempfile.mkdtemp(prefix="sweeper-pg-"))
    if root:
        shutil.chown(base, "postgres")
    data = base / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = "postgres" if root else os.environ.get("USER", "postgres")

    def run(*cmd: str) -> None:
        r = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    run(str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w",
        "-o", f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "sweeper")
        yield f"postgresql://{user}:secret@127.0.0.1:{port}/sweeper"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_two_sweeps_share_a_postgres_study(outputs, mlflow_client, postgres_url):
    storage = f"hydra.sweeper.storage='{postgres_url}'"
    procs = [start(outputs, "hydra.sweeper.n_trials=6", storage, log_name=f"pg{i}")
             for i in range(2)]
    for i, p in enumerate(procs):
        finish(p, outputs, f"pg{i}")
    study = optuna.load_study(study_name=STUDY, storage=rdb_url(postgres_url))
    assert len(study.trials) == 6
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert len({t.system_attrs["sweeper:worker"] for t in study.trials}) == 2
    assert not (outputs / "optuna").exists()  # nothing in the default journal
    parent, children = study_runs(mlflow_client)
    assert len(children) == 6 and parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.storage"] == postgres_url.replace(":secret@", ":***@")
    check_consistent(study, mlflow_client)
