"""Shared fixtures: tiny configs composed from the real conf/ tree (sweeper.config.CONF_DIR),
outputs in a temp folder, a throw-away PostgreSQL server (tests/servers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sweeper.config import CONF_DIR as CONF
from tests import servers

ROOT = Path(__file__).resolve().parent.parent

# Small and fast: random-init ResNet-18 on 32 px FakeData, one epoch.
TINY = [
    "backbone.weights=none",
    "dataset=fake",
    "trainer.epochs=1",
    "trainer.batch_size=8",
    "trainer.device=cpu",
]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` need CUDA: skipped where it is absent (CI), run by ``pytest -m gpu``."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def empty_cache_memory() -> Iterator[None]:
    """Each test starts with no feature-cache entry in this process's memory: a test that
    expects a fill (or a write that fails) must not find an earlier test's entry."""
    from sweeper.feeds import MEMORY

    MEMORY.clear()
    yield
    MEMORY.clear()


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A fresh outputs/ folder (MLflow store, runs, checkpoints) for one test."""
    out = tmp_path / "outputs"
    out.mkdir()
    return out


@pytest.fixture
def make_cfg(outputs: Path):
    """Compose ``conf/config.yaml`` with TINY plus ``overrides``, writing under ``outputs``."""

    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[*(TINY if tiny else []),
                                                f"paths.outputs={outputs}", *overrides])

    return make


@pytest.fixture
def cli(outputs: Path):
    """Run ``python -m sweeper.run FLAGS TINY OVERRIDES`` in a subprocess, writing to ``outputs``."""

    def run(*overrides: str, flags: tuple[str, ...] = (), tiny: bool = True,
            env: dict | None = None, timeout: float = 600):
        cmd = [sys.executable, "-m", "sweeper.run", *flags, *(TINY if tiny else []),
               f"paths.outputs={outputs}", *overrides]
        full_env = {**os.environ, "HYDRA_FULL_ERROR": "", **(env or {})}
        full_env.pop("MLFLOW_TRACKING_URI", None)
        return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                              timeout=timeout)

    return run


@pytest.fixture
def mlflow_client(outputs: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL server (trust auth, 127.0.0.1 only) and an empty database."""
    problem = servers.postgres_missing()
    if problem:
        pytest.skip(problem)
    with servers.postgres() as url:
        yield url
