"""Hydra plugin registration for the project's Optuna sweeper (code in ``sweeper/``).

Hydra instantiates plugins only from the ``hydra_plugins`` namespace package and imports
every module in it at start-up, so this shim stays light: the study machinery (Optuna,
MLflow, torch) is imported when a sweep starts. The config is ``conf/hydra/sweeper/optuna.yaml``.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Optuna 5 study over the search space in ``hydra.sweeper.params``; see :mod:`sweeper.study`."""

    def __init__(self, **settings: Any) -> None:  # settings are read from the config in setup
        from sweeper.study import HydraSweeper

        self._impl = HydraSweeper()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self._impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = self._impl.launcher

    def sweep(self, arguments: list[str]) -> Any:
        return self._impl.sweep(arguments)
