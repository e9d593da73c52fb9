"""Throw-away servers for tests: PostgreSQL, an MLflow tracking server, a one-node Slurm cluster.

Each one lives in its own temp folder and listens on ports picked when it starts, so that
several test runs on one machine never meet; each is stopped, by the ids of the processes it
started, when its ``with`` block ends, whether the test passed or not.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(ready: Callable[[], bool], what: str, timeout: float, log: Path | None = None,
             proc: subprocess.Popen | None = None) -> None:
    """Poll ``ready`` until it holds; fail with ``what`` and the end of ``log`` otherwise."""
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline or (proc is not None and proc.poll() is not None):
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} did not come up within {timeout:g} s:\n{tail}")
        time.sleep(0.2)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _daemon(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (so that stopping it stops its children)."""
    with open(log, "ab") as out:
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


# -- PostgreSQL ------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_missing() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None."""
    if postgres_bindir() is None:
        return "PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as 'postgres'"
    return None


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 (trust auth) with an empty database ``sweeper``;
    yields its URL (the password in it is ignored, and shows where one would go)."""
    bindir = postgres_bindir()
    assert bindir is not None, postgres_missing()
    root = os.geteuid() == 0
    as_user = ["runuser", "-u", "postgres", "--"] if root else []  # initdb refuses root
    # A folder of its own, outside the test's (which 'postgres' may not enter).
    base = Path(tempfile.mkdtemp(prefix="sweeper-pg-"))
    if root:
        shutil.chown(base, "postgres")
    data = base / "data"
    port = free_port()
    user = "postgres" if root else os.environ.get("USER", "postgres")

    def run(*cmd: str) -> None:
        r = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w",
            "-o", f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off", "start")
        try:
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user,
                "sweeper")
            yield f"postgresql://{user}:secret@127.0.0.1:{port}/sweeper"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- MLflow tracking server ------------------------------------------------------------------


@dataclass
class MlflowServer:
    url: str
    port: int
    artifacts: Path  # where the server keeps the artifacts it serves (--artifacts-destination)
    log: Path


@contextmanager
def mlflow_server(base: Path, backend_store_uri: str | None = None) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1, one worker, serving artifacts from ``base/artifacts``
    (clients read and write them through the server). The store is ``base/mlflow.db``
    unless ``backend_store_uri`` names another."""
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = base / "mlflow-server.log"
    server = MlflowServer(f"http://127.0.0.1:{port}", port, base / "artifacts", log)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner needed
    proc = _daemon([sys.executable, "-m", "mlflow", "server",
                    "--backend-store-uri", backend_store_uri or f"sqlite:///{base}/mlflow.db",
                    "--artifacts-destination", str(server.artifacts),
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log, env)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, "mlflow server", 120, log, proc)
        yield server
    finally:
        _stop(proc)


# -- a one-node Slurm cluster ----------------------------------------------------------------

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "srun", "squeue",
                  "sacct", "sacctmgr", "scancel", "sinfo", "mariadb-install-db", "mariadb-admin")


def slurm_missing() -> str | None:
    """Why a Slurm cluster cannot be started here, or None."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if not (shutil.which("mariadbd") or shutil.which("mysqld")):
        missing.append("mariadbd")
    if missing:
        return (f"Slurm test cluster: {', '.join(missing)} not installed; ./setup.sh installs "
                "them (Debian packages slurm-wlm, slurmdbd, munge, mariadb-server)")
    if os.geteuid() != 0:
        return "Slurm test cluster: slurmd and slurmctld run as root here; run the tests as root"
    return None


@dataclass
class SlurmCluster:
    """A running cluster: pass ``env`` to its client commands (sbatch, squeue, ...)."""

    base: Path
    env: dict[str, str]
    partition: str
    kill_wait_s: int

    def run(self, *cmd: str, check: bool = True) -> str:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stdout}{r.stderr}")
        return r.stdout

    def jobs(self) -> dict[str, str]:
        """Job id -> state of the jobs Slurm holds (pending, running, completing)."""
        out = self.run("squeue", "--noheader", "--format=%i %T")
        return dict(line.split() for line in out.splitlines() if line.strip())

    def accounting(self, *job_ids: str, timeout: float = 30) -> dict[str, str]:
        """Job id -> final state as ``sacct`` reports it (what submitit reads), once every
        job has one (slurmctld tells slurmdbd a moment after the fact)."""
        states: dict[str, str] = {}

        def final() -> bool:
            out = self.run("sacct", "--noheader", "--parsable2", "--allocations",
                           "--format=JobID,State", "--jobs", ",".join(job_ids))
            states.clear()
            states.update(line.split("|", 1) for line in out.splitlines() if line.strip())
            return set(states) == set(job_ids) and not any(
                s in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "SUSPENDED")
                for s in states.values())

        wait_for(final, f"final states of jobs {', '.join(job_ids)} in sacct", timeout)
        return states

    def job_times(self, *job_ids: str) -> dict[str, dict[str, str]]:
        """Job id -> sacct's Submit, Start, End (ISO times) and Elapsed of each job."""
        fields = ["JobID", "Submit", "Start", "End", "Elapsed"]
        out = self.run("sacct", "--noheader", "--parsable2", "--allocations",
                       f"--format={','.join(fields)}", "--jobs", ",".join(job_ids))
        rows = [dict(zip(fields, line.split("|"), strict=True))
                for line in out.splitlines() if line.strip()]
        return {row.pop("JobID"): row for row in rows}

    def cancel_all(self) -> None:
        """Cancel every job and wait (KillWait and a margin) until Slurm holds none."""
        self.run("scancel", "--user=root", check=False)
        wait_for(lambda: not self.jobs(), "the end of the jobs", self.kill_wait_s + 15)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.base / "log").glob("*")))


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return int(total_kb / 1024 * 0.9)  # slurmd drains a node that has less than configured


def _leftovers(slurm_conf: str) -> list[int]:
    """Processes of this cluster still alive (job steps and their children carry its
    SLURM_CONF in their environment)."""
    mark = f"SLURM_CONF={slurm_conf}".encode()
    pids = []
    for env_file in glob.glob("/proc/[0-9]*/environ"):
        try:
            if mark in Path(env_file).read_bytes().split(b"\0"):
                pids.append(int(env_file.split("/")[2]))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


@contextmanager
def slurm_cluster(base: Path, kill_wait_s: int = 5) -> Iterator[SlurmCluster]:
    """munged, MariaDB, slurmdbd, slurmctld and slurmd, all under ``base``, as root.

    slurmdbd (on MariaDB) is there because ``sacct``, which submitit reads to learn that a
    job ended without a result (cancelled, killed), needs job accounting. ``kill_wait_s`` is
    Slurm's KillWait: the time a cancelled job's processes get between SIGTERM (which
    submitit's jobs ignore) and SIGKILL; slurmd gives them about 5 s even when it is lower.
    """
    problem = slurm_missing()
    assert problem is None, problem
    host = socket.gethostname()
    etc, state, spool, log, munge, db = (base / d for d in
                                         ("etc", "state", "spool", "log", "munge", "db"))
    for d in (etc, state, spool, log, munge):
        d.mkdir(parents=True, exist_ok=True)
    munge.chmod(0o711)  # clients (any user) reach the socket; the key stays private
    key = munge / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    sock = munge / "munge.socket"
    slurm_conf = etc / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(slurm_conf)}
    cpus = os.cpu_count() or 1
    partition = "debug"
    db_port, dbd_port, ctld_port, slurmd_port = free_port(), free_port(), free_port(), free_port()

    (etc / "slurmdbd.conf").write_text("\n".join([
        "AuthType=auth/munge", f"AuthInfo=socket={sock}",
        "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={dbd_port}", "SlurmUser=root",
        "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
        f"StoragePort={db_port}", "StorageUser=root", "StorageLoc=slurm_acct_db",
        f"PidFile={state}/slurmdbd.pid", f"LogFile={log}/slurmdbd.log", ""]))
    (etc / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a readable one
    slurm_conf.write_text("\n".join([
        "ClusterName=sweeper", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU_Memory",
        "ReturnToService=2", f"KillWait={kill_wait_s}",
        f"StateSaveLocation={state}", f"SlurmdSpoolDir={spool}",
        f"SlurmctldPidFile={state}/slurmctld.pid", f"SlurmdPidFile={state}/slurmd.pid",
        f"SlurmctldLogFile={log}/slurmctld.log", f"SlurmdLogFile={log}/slurmd.log",
        "AccountingStorageType=accounting_storage/slurmdbd",
        "AccountingStorageHost=localhost", f"AccountingStoragePort={dbd_port}",
        # the munge socket for talking to slurmdbd (AuthInfo covers the rest)
        f"AccountingStoragePass={sock}",
        "JobAcctGatherType=jobacct_gather/none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} "
        "State=UNKNOWN",
        f"PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    cluster = SlurmCluster(base, env, partition, kill_wait_s)

    def ok(*cmd: str) -> Callable[[], bool]:
        return lambda: subprocess.run(list(cmd), env=env, capture_output=True,
                                      timeout=30).returncode == 0

    with ExitStack() as stack:
        # Last on the way out: any process of this cluster's jobs that outlived the daemons,
        # then the database (the logs stay for a look after a failure).
        stack.callback(shutil.rmtree, db, ignore_errors=True)
        stack.callback(_kill_leftovers, str(slurm_conf))

        def daemon(name: str, *cmd: str) -> subprocess.Popen:
            proc = _daemon(cmd, log / f"{name}.out", env)
            stack.callback(_stop, proc)
            return proc

        munged = daemon("munged", "munged", "--foreground", "--force", f"--socket={sock}",
                        f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                        f"--log-file={log}/munged.log", f"--seed-file={munge}/munged.seed")
        wait_for(sock.exists, "munged", 30, log / "munged.log", munged)

        r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={db}",
                            "--user=root", "--auth-root-authentication-method=normal",
                            "--skip-test-db"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        mariadbd = daemon("mariadb", shutil.which("mariadbd") or "mysqld", "--no-defaults",
                          f"--datadir={db}", "--user=root", f"--socket={base}/mysql.sock",
                          "--bind-address=127.0.0.1", f"--port={db_port}", "--skip-log-bin",
                          f"--pid-file={state}/mariadb.pid", "--innodb-buffer-pool-size=32M")
        wait_for(ok("mariadb-admin", "--no-defaults", "-h", "127.0.0.1", f"-P{db_port}",
                    "-u", "root", "ping"), "MariaDB", 60, log / "mariadb.out", mariadbd)

        slurmdbd = daemon("slurmdbd", "slurmdbd", "-D")
        wait_for(lambda: _listening(dbd_port), "slurmdbd", 60, log / "slurmdbd.log", slurmdbd)
        cluster.run("sacctmgr", "--immediate", "add", "cluster", "sweeper")

        slurmctld = daemon("slurmctld", "slurmctld", "-D")

        def idle() -> bool:
            r = subprocess.run(["sinfo", "--noheader", "--format=%t"], env=env,
                               capture_output=True, text=True, timeout=30)
            return r.stdout.strip() == "idle"

        slurmd = daemon("slurmd", "slurmd", "-D")
        wait_for(idle, "slurmctld and slurmd (an idle node)", 60, log / "slurmctld.log",
                 slurmctld)
        assert slurmd.poll() is None, cluster.logs()

        # First on the way out: cancel the jobs left and give them KillWait to go.
        @stack.callback
        def _end_jobs() -> None:
            try:
                cluster.cancel_all()
            except Exception:  # noqa: BLE001 - the daemons are stopped next anyway
                pass

        yield cluster


def _kill_leftovers(slurm_conf: str) -> None:
    for pid in _leftovers(slurm_conf):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
