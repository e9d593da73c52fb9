"""Hydra plugin registration for the project's Optuna sweeper (code in ``sweeper/``).

Hydra instantiates plugins only from the ``hydra_plugins`` namespace package and imports
every module in it at start-up, so this shim stays light: the study machinery (Optuna,
MLflow, torch) is imported when a sweep starts. The config is ``conf/hydra/sweeper/optuna.yaml``.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

import hydra_plugins


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


# Files written for Hydra's official Optuna sweeper name its class as their _target_; Hydra
# finds plugins by "module.Class" name, so this subclass answers to that name and runs this
# sweeper on them (their keys: sweeper.study._schema). Where the official plugin is installed,
# its _target_ stays the official plugin's.
OFFICIAL = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
ALIASED = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None
if ALIASED:

    class OfficialOptunaSweeper(OptunaSweeper):
        """This sweeper, under the official plugin's class name (``OFFICIAL``)."""

        def __init__(self, **settings: Any) -> None:
            logging.getLogger("sweeper.study").info(
                "hydra.sweeper._target_ is hydra-optuna-sweeper's: this project's Optuna sweeper "
                "runs it (README, \"Coming from hydra-optuna-sweeper\")")
            super().__init__(**settings)

    _module, _name = OFFICIAL.rsplit(".", 1)
    OfficialOptunaSweeper.__module__ = _module
    OfficialOptunaSweeper.__name__ = OfficialOptunaSweeper.__qualname__ = _name
    # Hydra's instantiate finds the class by walking attributes from the package down; the
    # modules exist only as those attributes (not in sys.modules, so nothing imports them and
    # launchers pickle the class by value).
    _official = types.ModuleType("hydra_plugins.hydra_optuna_sweeper")
    _official.optuna_sweeper = types.ModuleType(_module)
    setattr(_official.optuna_sweeper, _name, OfficialOptunaSweeper)
    hydra_plugins.hydra_optuna_sweeper = _official
