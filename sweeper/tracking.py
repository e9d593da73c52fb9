"""MLflow: where runs go, and how a config, an environment and a result become a run.

The one place that decides how a config becomes MLflow params (flattened dotted keys of the
resolved config), which tags describe a run (:class:`Tag`, :class:`Kind`), what state a trial
ends in (:class:`State`) and how the command that trains a trial again is written.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import wait as futures_wait
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.entities import Param as MlflowParam
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from sqlalchemy import event, pool
from sqlalchemy.pool import Pool

from sweeper import background
from sweeper.config import resolved
from sweeper.errors import InterruptTracesToLogFiles, UserError, first_line

log = logging.getLogger(__name__)
for _noisy in ("alembic", "mlflow.store.db.utils"):  # schema set-up chatter on a new store
    logging.getLogger(_noisy).setLevel(logging.WARNING)
# A store's pool logs through its class's logger (SQLAlchemy's default, without echo_pool)
for _pool in (pool.QueuePool, pool.NullPool, pool.SingletonThreadPool, pool.StaticPool):
    logging.getLogger(f"{_pool.__module__}.{_pool.__name__}").addFilter(InterruptTracesToLogFiles())

PACKAGES = ("sweeper", "torch", "torchvision", "timm", "hydra-core", "optuna", "mlflow")
# The checkout this code runs from, when it does (an editable install); an installed wheel has
# no git state of its own (its site-packages may even sit inside someone else's repository).
_CHECKOUT = Path(__file__).resolve().parent.parent


class Tag(StrEnum):
    """Names of the MLflow tags that code reads back (the report, the study, re-runs)."""

    KIND = "sweeper.kind"  # a Kind
    STATE = "state"  # a trial's State
    ERROR = "error"  # why a run failed, was pruned or stopped
    PARENT = "mlflow.parentRunId"  # MLflow's own: the study's parent run
    STUDY = "optuna.study_name"
    TRIAL = "optuna.trial_number"
    STORAGE = "optuna.storage"  # the study's storage, password hidden
    OVERRIDES = "overrides"  # the Hydra task overrides, space-separated
    COMMAND = "command"  # the exact command line that ran
    RERUN_COMMAND = "rerun_command"  # train_command() of the overrides
    RERUN_OF = "rerun_of"
    WEIGHTS = "weights"  # where the backbone's weights came from
    PRETRAIN_RUN_ID = "pretrain_run_id"
    CHECKPOINT = "checkpoint"
    SCHEDULE = "freeze.schedule"  # which units train from which step (sweeper.schedule.describe)


class Kind(StrEnum):
    """What a run is (tag ``sweeper.kind``)."""

    TRIAL = "trial"
    STUDY = "study"
    PRETRAIN = "pretrain"


class State(StrEnum):
    """How a trial ended, as its run's ``state`` tag (and a study's tables) record it."""

    COMPLETE = "complete"
    PRUNED = "pruned"  # stopped by the study's pruner
    FAILED = "failed"
    KILLED = "killed"  # interrupted, or its process was lost before it could tell
    LOST = "lost"  # finished after another sweep had declared it lost: not in the study
    RUNNING = "running"
    WAITING = "waiting"

    @property
    def status(self) -> str:
        """The MLflow run status a run ending in this state gets."""
        return {State.COMPLETE: "FINISHED", State.PRUNED: "KILLED", State.KILLED: "KILLED",
                State.FAILED: "FAILED"}[self]

    @classmethod
    def of_status(cls, status: str) -> State:
        """The state of a run without a ``state`` tag, from its MLflow status."""
        return {"FINISHED": cls.COMPLETE, "KILLED": cls.PRUNED}.get(status, cls.FAILED)


class Param(StrEnum):
    """Config keys that readers of trial runs (report, re-run, benchmark) look up in a run's
    params: a param's name is its dotted config key (:func:`config_params`)."""

    STRATEGY = "freeze.strategy"  # depth | progressive | gradual (runs from before: depth)
    UNFROZEN = "freeze.unfrozen"
    TRANSFERRED = "freeze.transferred"
    NUM_UNITS = "backbone.num_units"
    LR_HEAD = "optim.lr_head"
    LR_BACKBONE = "optim.lr_backbone"
    SEED = "trainer.seed"
    SPLIT_SEED = "dataset.split_seed"
    EXPERIMENT = "tracking.experiment"
    DESIGN = "design.name"  # conf/experiment/yosinski.yaml and conf/treatment/
    TREATMENT = "design.treatment"
    DESIGN_SWEEP = "design.sweep"


def is_trial(run: Any) -> bool:
    """Whether an MLflow run (``mlflow.entities.Run``) is a trial's, the runs ``export run=``
    and ``rerun`` take: a study's parent run or a pretraining run has no freeze depth."""
    return Param.UNFROZEN in run.data.params


_RUN = ["python", "-m", "sweeper.run"]


def command_line() -> str:
    """The exact command line of this process (tag ``command``)."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def train_command(overrides: Sequence[str]) -> str:
    """The command that trains a trial with these Hydra overrides (tag ``rerun_command``).

    A named search (``hparams_search=NAME``) makes a sweep of any command it is in
    (``hydra.mode: MULTIRUN``, as in lightning-hydra-template); ``hydra.mode=RUN`` keeps the
    file's other settings and trains the one trial.
    """
    words = [*_RUN, *overrides]
    if any(o.split("=", 1)[0].lstrip("+") == "hparams_search" for o in overrides) and \
            not any(o.startswith("hydra.mode=") for o in overrides):
        words.append("hydra.mode=RUN")
    return shlex.join(words)


def command_overrides(command: str) -> list[str]:
    """The overrides of a :func:`train_command` (empty for an empty command)."""
    words = shlex.split(command)
    if words[:len(_RUN)] != _RUN:
        raise ValueError(f"not a sweeper.run command: {command!r}")
    return words[len(_RUN):]


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute (worker processes may change cwd)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


_opened: set[str] = set()  # stores this process has opened (and created, when new)
_WAL: set[str] = set()  # the SQLite files of those stores (see _sqlite_wal)


@event.listens_for(Pool, "connect")
def _sqlite_wal(connection: Any, _record: Any) -> None:
    """Every new SQLite connection to a store that :func:`open_store` opened writes ahead
    (``journal_mode=WAL``) and syncs at checkpoints only (``synchronous=NORMAL``), as SQLite
    recommends for most applications. MLflow leaves SQLite's defaults (a rollback journal,
    several fsyncs per commit): a trial's dozen small writes then waited on the disk, and
    readers such as ``mlflow ui`` blocked writers. WAL keeps the store consistent through a
    crash (a power cut may lose the last commits, not corrupt it); all its users must be on
    one machine, as SQLite already asks (many machines use a server, ``tracking=server``).
    A store another process holds in the old mode keeps it, with SQLite's safe defaults."""
    if not isinstance(connection, sqlite3.Connection) or not _WAL:
        return
    cursor = connection.cursor()
    try:
        files = {row[2] for row in cursor.execute("PRAGMA database_list")}
        if not files & _WAL:
            return
        if cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal":
            cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.OperationalError:  # locked by another connection: it stays as it was
        pass
    finally:
        cursor.close()


def download_artifact(client: MlflowClient, run_id: str, path: str, dst: str) -> str:
    """A run's artifact ``path`` downloaded into ``dst`` (its local path), without MLflow's
    progress bar: a line of its own in the middle of a command's output, for a file or two. A
    user's own ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` is kept."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as BAR

    if BAR.is_set():
        return client.download_artifacts(run_id, path, dst)
    os.environ[BAR.name] = "false"
    try:
        return client.download_artifacts(run_id, path, dst)
    finally:
        os.environ.pop(BAR.name, None)


def open_store(uri: str, key: str = "tracking.uri") -> MlflowClient:
    """A client of the MLflow tracking store at ``uri`` (made absolute), checked once per
    process: a new SQLite store is created under a file lock beside it, so that sweeps started
    at the same moment on a new folder do not both create its tables (MLflow's migrations are
    not safe to run twice at once); a store that cannot be opened is a :class:`UserError`
    naming ``key``."""
    uri = absolute_uri(uri)
    if uri in _opened:
        return MlflowClient(tracking_uri=uri)
    try:
        if uri.startswith(("http://", "https://")):
            import requests

            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        if uri.startswith("sqlite:///"):
            from filelock import FileLock

            _WAL.add(os.path.realpath(uri[len("sqlite:///"):]))
            # The client creates (and upgrades) the tracking and model-registry tables.
            with FileLock(uri[len("sqlite:///"):] + ".lock"):
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)
        else:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - every way a store fails is the user's to fix
        raise UserError(_store_problem(uri, key, e)) from None
    _opened.add(uri)
    return client


def _store_problem(uri: str, key: str, error: Exception) -> str:
    """What to tell the user when the store at ``uri`` cannot be opened."""
    label = _hide_password(uri)
    said = first_line(error)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if "not a database" in said or "malformed" in said:
            return (f"{key}={label}: {path} is not a readable MLflow store ({said}). Nothing was "
                    f"changed: move it aside (mv {path} {path}.bad) to start a new store there, "
                    "or point tracking.uri (or paths.outputs) elsewhere.")
        return (f"{key}={label}: the MLflow store {path} cannot be opened ({said}); check that "
                "its folder is writable, or point tracking.uri (or paths.outputs) elsewhere.")
    if uri.startswith(("http://", "https://")):
        return (f"{key}={label}: no MLflow tracking server answers there ({said}). Start one "
                "(mlflow server --host 0.0.0.0 --port 5000 ...) or fix the address.")
    return (f"{key}={label}: cannot open the MLflow tracking store ({said}). Use a SQLite file "
            "(sqlite:////abs/path/mlflow.db), a database URL (postgresql://user:password@host/db) "
            "or a tracking server (http://host:5000), and check that it is reachable.")


def _hide_password(uri: str) -> str:
    if "://" not in uri or "@" not in uri:
        return uri
    from sqlalchemy.engine import make_url

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: show the scheme only
        return uri.split("://", 1)[0] + "://..."


def check_store(uri: str) -> None:
    """Fail with what to do unless the tracking store at ``uri`` can be opened (a new SQLite
    store is created, as the first run would)."""
    open_store(uri)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": value}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_NOT_IN_A_NAME = re.compile(r"[^/\w.\- ]")  # what MLflow refuses in a param name (":" too on Windows)


def param_name(key: str) -> str:
    """``key`` as an MLflow param name, the one place that makes one.

    Hydra override keys carry ``+``/``++`` (add) and ``~`` (delete), which MLflow refuses;
    they are dropped (``search.+trainer.note`` becomes ``search.trainer.note``), any other
    character MLflow refuses becomes ``_``, and the name is made a plain relative path
    (MLflow treats names as paths: no ``//``, ``..`` or leading ``/``).
    """
    name = _NOT_IN_A_NAME.sub("_", re.sub(r"(^|\.)[+~]+", r"\1", str(key)))
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    name = posixpath.normpath("/".join(parts)) if parts else "_"
    return name


def config_params(cfg: DictConfig | Mapping[str, Any],
                  only: tuple[str, ...] | None = None) -> dict[str, str]:
    """Every resolved config value (the ``hydra`` node excepted) as a flat string param.

    ``cfg`` is a config, or one already :func:`~sweeper.config.resolved`; ``only`` keeps just
    those top-level keys.
    """
    tree = resolved(cfg) if isinstance(cfg, DictConfig) else cfg
    if only is not None:
        tree = {k: tree[k] for k in only}
    return {k: str(v) for k, v in flatten(tree).items()}


def code_version() -> dict[str, str]:
    """Which code runs (tags ``git_commit``, ``git_dirty``, ``version.sweeper``): the commit and
    whether it has uncommitted changes, from git when it runs from a checkout; for an installed
    package, the commit pip recorded when it was installed from a git URL (PEP 610), else
    ``unknown`` (``version.sweeper`` still says which release it is)."""
    version = {"version.sweeper": _version("sweeper")}
    if (_CHECKOUT / ".git").exists() and (_CHECKOUT / "pyproject.toml").is_file():
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=_CHECKOUT, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        try:
            commit = git("rev-parse", "HEAD")
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.SubprocessError):
            return {"git_commit": "unknown", "git_dirty": "unknown", **version}
        return {"git_commit": commit, "git_dirty": str(dirty).lower(), **version}
    try:
        origin = json.loads(metadata.distribution("sweeper").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        origin = {}
    commit = origin.get("vcs_info", {}).get("commit_id")
    if commit:
        return {"git_commit": commit, "git_dirty": "false", **version}
    return {"git_commit": "unknown", "git_dirty": "unknown", **version}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


# Where a run ran on a cluster: its Slurm job (and array task), to find its log and its
# accounting (sacct -j JOB) from the run.
SLURM_TAGS = {"slurm.job_id": "SLURM_JOB_ID", "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
              "slurm.array_task_id": "SLURM_ARRAY_TASK_ID"}


@functools.cache
def _environment() -> tuple[tuple[str, str], ...]:
    tags = {f"version.{p}": _version(p) for p in PACKAGES}
    tags["version.python"] = sys.version.split()[0]
    tags.update(code_version())
    return tuple(tags.items())


def environment_tags() -> dict[str, str]:
    """Package versions and the code's version (read once per process: a study's trials run
    the code the process started with), and the Slurm job the run is part of."""
    tags = dict(_environment())
    tags.update({tag: os.environ[var] for tag, var in SLURM_TAGS.items() if os.environ.get(var)})
    return tags


# MLflow 3's UI opens an experiment on the page its kind says; without this tag it shows the
# GenAI overview (traces) instead of the runs. "custom_model_development" opens on the runs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def trial_run_name(backbone: str, dataset: str, unfrozen: int,
                   number: int | str | None = None, strategy: str = "depth") -> str:
    """A trial run's name: in a study ``t007-resnet18-u5`` (the trial number first: names are
    unique and sort in trial order in the MLflow UI, and stay short enough not to be cut),
    else ``resnet18-fashion_mnist-unfrozen5``; a freeze strategy other than ``depth`` comes
    before the depth (``t007-resnet18-progressive-u5``)."""
    how = "" if strategy == "depth" else f"{strategy}-"
    if number is not None:
        return f"t{int(number):03d}-{backbone}-{how}u{int(unfrozen)}"
    return f"{backbone}-{dataset}-{how}unfrozen{int(unfrozen)}"


class Tracker:
    """An MLflow experiment in a tracking store, from a ``tracking/`` config.

    The experiment is looked up (or created) once per process and store: the trials of a
    study share it.
    """

    _experiments: dict[tuple[str, str, str | None], str] = {}

    def __init__(self, tracking: DictConfig) -> None:
        self.uri = absolute_uri(str(tracking.uri))
        self.client = open_store(self.uri)
        location = tracking.get("artifact_location")
        key = (self.uri, str(tracking.experiment), None if location is None else str(location))
        if key not in Tracker._experiments:
            Tracker._experiments[key] = self._experiment(str(tracking.experiment), location)
        self.experiment_id = Tracker._experiments[key]

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = Path(artifact_location).resolve().as_uri() if artifact_location else None
            try:
                return self.client.create_experiment(name, artifact_location=location,
                                                     tags=EXPERIMENT_TAGS)
            except MlflowException:  # another process created it first (mlflow #4123)
                exp = self.client.get_experiment_by_name(name)
        for key, value in EXPERIMENT_TAGS.items():  # an experiment made before the tag existed
            if exp.tags.get(key) != value:
                self.client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def start(self, name: str, tags: Mapping[str, str] | None = None,
              parent_run_id: str | None = None, flush_every_s: float = 0.0,
              background: bool = False) -> Run:
        """A new run (see :class:`Run` for ``flush_every_s`` and ``background``)."""
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            tags[Tag.PARENT.value] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return Run(self.client, run.info.run_id, flush_every_s, background)


# MLflow's limits for one log_batch call
_BATCH = {"params": 100, "tags": 100, "metrics": 1000}


class Run:
    """One MLflow run, written through the client (several may be open in one process).

    With ``flush_every_s=0`` every call is written at once. With ``flush_every_s > 0`` params,
    tags and metrics are kept and written together, in one transaction, by the first call
    that comes ``flush_every_s`` or more after the last write, by :meth:`flush`, and by
    :meth:`end` before the run ends: a trial of many short epochs writes a few batches
    instead of one transaction per call, a long epoch's metrics still appear when it ends,
    and a run always ends with everything written. (A process killed outright loses what was
    kept, at most ``flush_every_s`` of it; its run is failed as lost anyway.)

    With ``background``, those writes (and :meth:`text`, :meth:`artifact`) are made in order
    by the process's MLflow writer thread (:data:`sweeper.background.MLFLOW`) while the caller
    goes on: a write mostly waits for the store's disk. :meth:`end` waits for them before it
    ends the run, so an ended run holds everything; a write that failed raises its error at
    the next write or at :meth:`end`, and its batch is written again with the next one.
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every_s: float = 0.0,
                 background: bool = False) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.background = background
        self._pending: dict[str, list] = {"params": [], "tags": [], "metrics": []}
        self._last_write = time.monotonic()
        self._writes: list = []  # this run's background writes: (future, its batch or None)

    def params(self, params: Mapping[str, Any]) -> None:
        named = {param_name(k): str(v)[:6000] for k, v in params.items()}
        self._add("params", [MlflowParam(k, v) for k, v in named.items()])

    def tags(self, tags: Mapping[str, Any]) -> None:
        self._add("tags", [RunTag(str(k), str(v)) for k, v in tags.items()])

    def metrics(self, metrics: Mapping[str, float], step: int = 0, last: bool = False) -> None:
        """Log ``metrics`` at ``step``; ``last``: the run ends next, so they are kept for the
        write :meth:`end` makes (one write instead of a second one it would wait for)."""
        now = int(time.time() * 1000)
        self._add("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()], last)

    def _add(self, kind: str, items: list, keep: bool = False) -> None:
        self._pending[kind].extend(items)
        if not keep and time.monotonic() - self._last_write >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Write everything kept, in as few ``log_batch`` calls as MLflow's limits allow
        (with ``background``: hand it to the writer thread)."""
        pending = self._pending
        self._last_write = time.monotonic()
        if not self.background:
            self._write(pending)
            return
        self._raise_failed()
        self._pending = {"params": [], "tags": [], "metrics": []}
        if any(pending.values()):
            self._submit(lambda: self._write(pending), pending)

    def _write(self, pending: dict[str, list]) -> None:
        # A tag set twice before a write: the last value (one batch may not hold both).
        pending["tags"] = list({t.key: t for t in pending["tags"]}.values())
        while any(pending.values()):
            batch = {kind: items[:_BATCH[kind]] for kind, items in pending.items()}
            self.client.log_batch(self.run_id, **batch)
            for kind in pending:
                del pending[kind][:_BATCH[kind]]

    def _submit(self, write: Callable[[], None], batch: dict[str, list] | None = None) -> None:
        self._writes.append((background.MLFLOW.submit(write), batch))

    def _raise_failed(self, wait: bool = False) -> None:
        """Raise the error of a background write that failed (with ``wait``: after waiting for
        them all); its batch goes back to the pending items, to be written with the next."""
        if wait:
            futures_wait([f for f, _ in self._writes])
        done = [(f, b) for f, b in self._writes if f.done()]
        self._writes = [(f, b) for f, b in self._writes if not f.done()]
        failed = [(f, b) for f, b in done if f.exception() is not None]
        for _, batch in failed:
            for kind, items in (batch or {}).items():
                self._pending[kind][:0] = items
        if failed:
            raise failed[0][0].exception()

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._call(self.client.log_artifacts, self.run_id, str(path), artifact_path)
        else:
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def text(self, text: str, name: str) -> None:
        self._call(self.client.log_text, self.run_id, text, name)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.background:
            self._raise_failed()
            self._submit(lambda: fn(*args))
        else:
            fn(*args)

    def end(self, status: str = "FINISHED", error: BaseException | str | None = None) -> None:
        """End the run with MLflow ``status``; ``error`` (an exception or a reason) is tagged.
        Everything kept is written first (and every background write has ended)."""
        if error is not None:
            reason = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
            self._pending["tags"].append(RunTag(Tag.ERROR, reason[:5000]))
        if self.background:
            self._raise_failed(wait=True)
        self._write(self._pending)
        self.client.set_terminated(self.run_id, status=status)

    def finish(self, state: State, error: BaseException | str | None = None) -> None:
        """End a trial's run in ``state``: its ``state`` tag and the matching MLflow status."""
        self._pending["tags"].append(RunTag(Tag.STATE, str(state)))
        self.end(state.status, error)
