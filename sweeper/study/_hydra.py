"""The Hydra side of the study: settings from ``hydra.sweeper``, trials through Hydra's launcher.

Registered with Hydra by ``hydra_plugins/sweeper_optuna`` (Hydra loads plugins only from the
``hydra_plugins`` namespace), a shim that imports this package only when a sweep starts.
Each trial is one ``launch`` of one job, from one thread per worker, so with ``n_jobs=N`` a
finished worker starts the next trial at once: no batches. With Hydra's basic launcher (jobs
in this process, the default) the sweep runs each job as that launcher would, with its config
from :class:`TrialConfigs` (the last trial's, with the sampled values set).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from hydra import version
from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra.core.config_loader import ConfigLoader
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from hydra.core.plugins import Plugins
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    configure_log,
    env_override,
    filter_overrides,
    setup_globals,
)
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from sweeper.config import task_config, yaml_text
from sweeper.errors import UserError, exit_user_error
from sweeper.study._runner import StudyRunner
from sweeper.study._schema import check_settings
from sweeper.study._settings import one_at_a_time, settings_in
from sweeper.study._space import quote
from sweeper.validate import check_config

log = logging.getLogger("sweeper.study")

_ABSENT = object()


class HydraSweeper:
    """What :class:`hydra_plugins.sweeper_optuna.OptunaSweeper` does, outside ``hydra_plugins``."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
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
        here = type(launcher).__name__ == "BasicLauncher"
        if here:
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

        configs = None
        if here:  # as Hydra's basic launcher sets up before its jobs
            configs = TrialConfigs(self.hydra_context.config_loader, self.config)
            setup_globals()
            configure_log(hc.hydra_logging, hc.verbose)

        def launch(number: int, overrides: list[str]) -> None:
            job = [*overrides, f"hydra.sweeper.trial={number}", *storage]
            if configs is not None:
                ret = self._launch_here(configs, job, number)
            else:
                (ret,) = launcher.launch([job], initial_job_idx=number)
            if ret.status == JobStatus.FAILED:
                ret.return_value  # noqa: B018 - re-raises the job's exception

        runner = StudyRunner(settings, task, launch, arguments)
        # Jobs may run elsewhere (another cwd, another machine): give them the storage as the
        # sweep resolved it, and the study's name (a null one is this sweep's own).
        storage.append(f"hydra.sweeper.storage={quote(runner.storage_spec)}")
        storage.append(f"hydra.sweeper.study_name={quote(runner.name)}")
        return runner.run(str(settings.get("progress", "auto")))


    def _launch_here(self, configs: TrialConfigs, job: list[str], number: int) -> JobReturn:
        """What Hydra's basic launcher does for one job, with its config from ``configs``."""
        hc = self.config.hydra
        Path(str(hc.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching 1 jobs locally")
        log.info("\t#%d : %s", number, " ".join(filter_overrides(job)))
        cfg = configs(job)
        with open_dict(cfg):
            cfg.hydra.job.id = number
            cfg.hydra.job.num = number
        try:
            return self._run_job(cfg)
        finally:
            configure_log(hc.hydra_logging, hc.verbose)  # as the launcher left it

    def _run_job(self, cfg: DictConfig) -> JobReturn:
        """Hydra's ``run_job`` for a job of this process: the same output folder, working
        directory, job logging, ``.hydra/`` files, environment, callbacks and
        :class:`~hydra.core.utils.JobReturn`, without the copies it makes for a config that
        may outlive the sweep: ``cfg`` is the job's own (:class:`TrialConfigs`), so Hydra's
        view of it is made once and its output folder set in place, and the ``JobReturn``
        holds that view instead of another copy (about 0.03 s of CPU per trial)."""
        hydra = HydraConfig.instance()
        before, cwd = hydra.cfg, os.getcwd()
        hydra.set_config(cfg)  # hydra.sweep.dir may read it (${hydra:...})
        output_dir = os.path.abspath(os.path.join(str(OmegaConf.select(cfg, "hydra.sweep.dir")),
                                                  str(OmegaConf.select(cfg, "hydra.sweep.subdir"))))
        for runtime in (cfg.hydra.runtime, hydra.cfg.hydra.runtime):
            with read_write(runtime), open_dict(runtime):
                runtime.output_dir = output_dir
        chdir = False
        try:
            # run_job's deep copy of the whole config less ``hydra``, without copying Hydra's
            # node only to drop it (more than half of the copy's time)
            task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            OmegaConf.set_struct(task_cfg, OmegaConf.is_struct(cfg))
            OmegaConf.set_readonly(task_cfg, OmegaConf.is_readonly(cfg))
            OmegaConf.copy_cache(from_config=cfg, to_config=task_cfg)
            ret = JobReturn(cfg=task_cfg, hydra_cfg=hydra.cfg,
                            overrides=list(cfg.hydra.overrides.task))
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            chdir = cfg.hydra.job.chdir
            if chdir is None:
                chdir = not version.base_at_least("1.2")
            if chdir:
                os.chdir(output_dir)
            ret.working_dir = os.getcwd()
            configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)
            if cfg.hydra.output_subdir is not None:
                folder = Path(output_dir) / str(cfg.hydra.output_subdir)
                folder.mkdir(parents=True, exist_ok=True)
                for node, name in ((task_cfg, "config.yaml"), (hydra.cfg, "hydra.yaml"),
                                   (cfg.hydra.overrides.task, "overrides.yaml")):
                    (folder / name).write_text(
                        yaml_text(OmegaConf.to_container(node, enum_to_str=True)), encoding="utf-8")
            callbacks = self.hydra_context.callbacks
            with env_override(cfg.hydra.job.env_set):
                callbacks.on_job_start(config=cfg, task_function=self.task_function)
                try:
                    ret.return_value = self.task_function(task_cfg)
                    ret.status = JobStatus.COMPLETED
                except Exception as e:  # noqa: BLE001 - Hydra's way: the job's return holds it
                    ret.return_value = e
                    ret.status = JobStatus.FAILED
            ret.task_name = JobRuntime.instance().get("name")
            for handler in logging.getLogger().handlers:  # as run_job's _flush_loggers
                handler.flush()
            callbacks.on_job_end(config=cfg, job_return=ret)
            return ret
        finally:
            hydra.cfg = before
            if chdir:
                os.chdir(cwd)


class TrialConfigs:
    """The config of each trial's job, as Hydra's ``load_sweep_config`` composes it, without
    composing every one from the config files.

    A study's trials differ mostly in the values its search space samples. Once Hydra has
    composed one trial's config, a trial whose overrides differ from that one's only in the
    values of the same plain keys (``key=value``, a value that is not a dict or a list, a key
    that is not a config group), or that adds plain overrides of keys the config has, gets a
    copy of it with those values set as Hydra sets them (``OmegaConf.update``), and Hydra's
    override lists and ``hydra.job.override_dirname`` rewritten. One composed config is kept
    per shape of the overrides (which keys, and any override that is not plain, as written):
    a search whose trials set fewer keys first (no ``lr_backbone`` when nothing trains)
    composes once; the other order, twice. Composing costs about 0.1 s of CPU per trial, the
    copy about a tenth of that.
    """

    KEEP = 16  # shapes kept; the oldest goes first

    def __init__(self, config_loader: ConfigLoader, master: DictConfig) -> None:
        self.loader = config_loader
        self.master = master
        self._composed: dict[tuple, tuple[list[Override], DictConfig]] = {}

    def __call__(self, overrides: list[str]) -> DictConfig:
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
        shape = tuple(("=", o.key_or_group) if _plain(o) else o.input_line for o in parsed)
        found = self._composed.get(shape)
        cfg = self._from(found, parsed) if found is not None else None
        for other in reversed(list(self._composed.values()) if found is None else []):
            cfg = self._from(other, parsed)  # one with fewer plain keys (no lr_backbone)
            if cfg is not None:
                break
        if cfg is None:
            cfg = self.loader.load_sweep_config(self.master, list(overrides))
            self._composed.pop(shape, None)
            self._composed[shape] = (parsed, copy.deepcopy(cfg))
            while len(self._composed) > self.KEEP:
                del self._composed[next(iter(self._composed))]
        return cfg

    def _from(self, composed: tuple[list[Override], DictConfig],
              parsed: list[Override]) -> DictConfig | None:
        before, last = composed
        # Each override of the composed config, in its order, with perhaps plain ones it lacks
        # among them (a trial that trains units sets lr_backbone, a depth-0 trial does not).
        by_key = {o.key_or_group: o for o in before}
        if len(by_key) != len(before) or [
                o.key_or_group for o in parsed if o.key_or_group in by_key] != list(by_key):
            return None
        pairs = [(by_key.get(o.key_or_group), o) for o in parsed]
        changed = []
        for old, new in pairs:
            if old is not None and old.input_line == new.input_line:
                continue
            key = new.key_or_group
            if not _plain(new) or (old is not None and not _plain(old)) \
                    or key in last.hydra.runtime.choices or not _leaf(last, key):
                return None
            changed.append(new)
        if len({o.key_or_group for o in changed}) != len(changed):
            return None
        cfg = copy.deepcopy(last)
        for o in changed:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        task = [o for o in parsed if not o.is_hydra_override()]
        hc = cfg.hydra
        hc.overrides.hydra = [*self.master.hydra.overrides.hydra,
                              *(o.input_line for o in parsed if o.is_hydra_override())]
        hc.overrides.task = [o.input_line for o in task]
        dirname = hc.job.config.override_dirname
        hc.job.override_dirname = get_overrides_dirname(
            overrides=task, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys)
        OmegaConf.copy_cache(from_config=self.master, to_config=cfg)
        return cfg


def _plain(o: Override) -> bool:
    """``key=value``: a change of one value (not a group, a package, an addition or a
    deletion, a sweep, a dict or a list)."""
    return (o.type == OverrideType.CHANGE and o.package is None and "/" not in o.key_or_group
            and o.value_type == ValueType.ELEMENT and not isinstance(o.value(), (dict, list)))


def _leaf(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` holds a value in ``cfg`` (not a node, not absent)."""
    node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    return node is not _ABSENT and not OmegaConf.is_config(node)


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
            exit_user_error(e)


def runs_here(target: str) -> bool:
    """Whether a ``hydra.sweeper._target_`` is this project's sweeper (or its alias)."""
    from hydra_plugins.sweeper_optuna import ALIASED, OFFICIAL  # the plugin's light shim

    return target.endswith("sweeper_optuna.OptunaSweeper") or (target == OFFICIAL and ALIASED)
