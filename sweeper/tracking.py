"""MLflow: where runs go, and how a config, an environment and a result become a run.

The one place that decides how a config becomes MLflow params (flattened dotted keys of the
resolved config) and which tags describe a run's code and environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
for _noisy in ("alembic", "mlflow.store.db.utils"):  # schema set-up chatter on a new store
    logging.getLogger(_noisy).setLevel(logging.WARNING)

PACKAGES = ("torch", "torchvision", "hydra-core", "optuna", "mlflow")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute (worker processes may change cwd)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": value}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_params(cfg: DictConfig, only: tuple[str, ...] | None = None) -> dict[str, str]:
    """Every resolved config value (the ``hydra`` node excepted) as a flat string param.

    ``only`` keeps just those top-level keys.
    """
    tree = OmegaConf.to_container(cfg, resolve=True)
    tree.pop("hydra", None)
    if only is not None:
        tree = {k: tree[k] for k in only}
    return {k: str(v) for k, v in flatten(tree).items()}


def git_state() -> dict[str, str]:
    """The commit of the code that runs, and whether its work tree has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def environment_tags() -> dict[str, str]:
    tags = {f"version.{p}": metadata.version(p) for p in PACKAGES}
    tags["version.python"] = sys.version.split()[0]
    tags.update(git_state())
    return tags


class Tracker:
    """An MLflow experiment in a tracking store, from a ``tracking/`` config."""

    def __init__(self, tracking: DictConfig) -> None:
        self.uri = absolute_uri(str(tracking.uri))
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(str(tracking.experiment), tracking.artifact_location)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = Path(artifact_location).resolve().as_uri() if artifact_location else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it first (mlflow #4123)
            return self.client.get_experiment_by_name(name).experiment_id

    def start(self, name: str, tags: Mapping[str, str] | None = None,
              parent_run_id: str | None = None) -> Run:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return Run(self.client, run.info.run_id)


class Run:
    """One MLflow run, written through the client (several may be open in one process)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step) for k, v in metrics.items()])

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def end(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        if error is not None:
            self.tags({"error": f"{type(error).__name__}: {error}"[:5000]})
        self.client.set_terminated(self.run_id, status=status)
