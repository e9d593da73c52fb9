"""The Hydra side of the study: settings from ``hydra.sweeper``, trials through Hydra's launcher.

Registered with Hydra by ``hydra_plugins/sweeper_optuna`` (Hydra loads plugins only from the
``hydra_plugins`` namespace), a shim that imports this package only when a sweep starts.
Each trial is one ``launch`` of one job, from one thread per worker, so with ``n_jobs=N`` a
finished worker starts the next trial at once: no batches.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from sweeper.config import task_config
from sweeper.errors import UserError
from sweeper.study._runner import StudyRunner
from sweeper.study._schema import check_settings
from sweeper.study._settings import one_at_a_time, settings_in
from sweeper.study._space import quote
from sweeper.validate import check_config

log = logging.getLogger("sweeper.study")


class HydraSweeper:
    """What :class:`hydra_plugins.sweeper_optuna.OptunaSweeper` does, outside ``hydra_plugins``."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        task = task_config(self.config)
        hc = self.config.hydra
        # The callback checked them before Hydra made the folder; completed again here (a
        # null study name is this sweep's), the storage left to the runner.
        settings = check_settings(hc.sweeper, task, arguments, choices=hc.runtime.choices,
                                  sweep_dir=hc.sweep.dir, storage=False)
        launcher = self.launcher
        if type(launcher).__name__ == "BasicLauncher":
            one_at_a_time(settings, "Hydra's basic launcher runs jobs in this process one at a "
                                    "time; use hydra/launcher=joblib (or submitit_local) for "
                                    "parallel trials")
        slots = self.config.hydra.launcher.get("n_jobs")  # joblib: -1 = one per CPU
        if slots is not None and int(slots) != 0:
            slots = int(slots) if int(slots) > 0 else (os.cpu_count() or 1) + 1 + int(slots)
            if slots < int(settings.n_jobs):
                log.warning("hydra.sweeper.n_jobs=%s but the launcher runs %d jobs at once: "
                            "set hydra.launcher.n_jobs=%s.", settings.n_jobs, slots,
                            settings.n_jobs)
        storage: list[str] = []

        def launch(number: int, overrides: list[str]) -> None:
            job = [*overrides, f"hydra.sweeper.trial={number}", *storage]
            (ret,) = launcher.launch([job], initial_job_idx=number)
            if ret.status == JobStatus.FAILED:
                ret.return_value  # noqa: B018 - re-raises the job's exception

        runner = StudyRunner(settings, task, launch, arguments)
        # Jobs may run elsewhere (another cwd, another machine): give them the storage as the
        # sweep resolved it, and the study's name (a null one is this sweep's own).
        storage.append(f"hydra.sweeper.storage={quote(runner.storage_spec)}")
        storage.append(f"hydra.sweeper.study_name={quote(runner.name)}")
        return runner.run(str(settings.get("progress", "auto")))


class CheckBeforeWork(Callback):
    """The whole config checked before Hydra creates a folder or starts a job
    (``hydra.callbacks.check`` in ``conf/config.yaml``): :func:`sweeper.validate.check_config`
    on the task config and, for a study, :func:`check_settings` on ``hydra.sweeper``.

    Hydra turns an exception raised in a callback into a warning and carries on, so a
    mistake is printed here, alone, and ends the process with status 1
    (``HYDRA_FULL_ERROR=1`` adds the trace)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, study=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, study=runs_here(str(config.hydra.sweeper.get("_target_", ""))))

    @staticmethod
    def _check(config: DictConfig, study: bool) -> None:
        try:
            HydraConfig.instance().set_config(config)  # ${hydra:...} in the task config
            task = task_config(config)
            check_config(task)
            if study:
                hc = config.hydra
                check_settings(settings_in(task, hc.sweeper), task, list(hc.overrides.task),
                               choices=hc.runtime.choices, sweep_dir=hc.sweep.dir)
        except UserError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                traceback.print_exc()
            print(str(e), file=sys.stderr)
            sys.exit(1)


def runs_here(target: str) -> bool:
    """Whether a ``hydra.sweeper._target_`` is this project's sweeper (or its alias)."""
    from hydra_plugins.sweeper_optuna import ALIASED, OFFICIAL  # the plugin's light shim

    return target.endswith("sweeper_optuna.OptunaSweeper") or (target == OFFICIAL and ALIASED)
