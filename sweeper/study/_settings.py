"""The sweep's settings (the ``hydra.sweeper`` node) and the Optuna objects they describe.

The Hydra sweeper and :func:`sweeper.study.optimize` read the same node
(``conf/hydra/sweeper/optuna.yaml``), resolved against the task config, and build the
sampler and pruner it names here.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sweeper.config import compose
from sweeper.errors import UserError
from sweeper.model import check_backbone
from sweeper.storage import StudyLock, open_storage
from sweeper.study._depth import with_repeats
from sweeper.study._space import Space, parse_space
from sweeper.validate import Rule, rule_for

log = logging.getLogger("sweeper.study")
# TPE's group, QMC and metric names have been "experimental" since Optuna 2-3; we rely on them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def default_settings() -> DictConfig:
    """The sweep settings of ``conf/hydra/sweeper/optuna.yaml`` with its default groups,
    unresolved (compose the project's config with ``return_hydra_config=True`` for the
    resolved ones)."""
    return compose(return_hydra_config=True).hydra.sweeper


def settings_in(cfg: DictConfig, sweeper: DictConfig) -> DictConfig:
    """``sweeper`` (the ``hydra.sweeper`` node) resolved against the task config ``cfg``.

    A job sees the task config and the Hydra config apart; interpolations such as
    ``${paths.optuna}`` or ``${trainer.epochs}`` in the sweeper node need both.
    """
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree["hydra"] = {"sweeper": OmegaConf.to_container(sweeper, resolve=False)}
    return OmegaConf.create(tree).hydra.sweeper


def one_at_a_time(settings: DictConfig, why: str) -> None:
    """Cap ``settings.n_jobs`` at 1, saying ``why``, when it asks for parallel trials."""
    if int(settings.n_jobs) > 1:
        log.warning("hydra.sweeper.n_jobs=%s: running 1 trial at a time (%s).",
                    settings.n_jobs, why)
        settings.n_jobs = 1


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with ``key=value`` overrides applied (values only, not config-group choices)."""
    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        OmegaConf.update(out, o.key_or_group, o.value(), merge=True)
    OmegaConf.set_struct(out, True)
    return out


@dataclass
class Search:
    """What a sweep samples: the space (adjusted to its sampler), the grid sampler's grid, the
    study's total of trials, and the config's value of each key (the depth sampler starts
    there)."""

    space: Space
    grid: dict[str, list[Any]] | None
    n_trials: int
    start: dict[str, Any]


def _kind(sampler: DictConfig | None) -> str:
    target = str(sampler.get("_target_")) if sampler is not None else ""
    return "grid" if target.endswith("GridSampler") else (
        "depth" if target.endswith("DepthSampler") else "other")


def search(settings: DictConfig, cfg: DictConfig, arguments: Sequence[str] = ()) -> Search:
    """The search of the (resolved) ``hydra.sweeper`` node ``settings`` for task config ``cfg``.

    The grid sampler covers every combination of the discrete parameters (continuous ones keep
    the config's values; ``n_trials`` becomes the grid's size); the depth sampler adds its
    repeat keys (``trainer.seed``, ``dataset.split_seed``) to the space.
    """
    space = parse_space(settings.params or {}, settings.get("conditions") or {}, arguments)
    n_trials = int(settings.n_trials)
    sampler = settings.get("sampler")
    grid = None
    if _kind(sampler) == "grid":
        grid, skipped = space.grid()
        if skipped:
            log.info("grid sampler: %s not searched (continuous); they keep the config's "
                     "values", ", ".join(skipped))
        space = space.restrict(list(grid))
        space.conditions.clear()
        size = math.prod(len(v) for v in grid.values())
        if size != n_trials:
            log.info("grid sampler: n_trials=%d, the size of the grid", size)
        n_trials = size
    fixed = dict(space.fixed)

    def value(key: str) -> Any:
        if key in fixed:
            return OverridesParser.create().parse_override(f"{key}={fixed[key]}").value()
        return OmegaConf.select(cfg, key)

    if _kind(sampler) == "depth":
        space = with_repeats(space, list(sampler.get("repeat_keys") or ()),
                             OmegaConf.select(cfg, "freeze.unfrozen"))
    start = {k: value(k) for k in [*space.sampled, *space.fixed]}
    return Search(space, grid, n_trials, start)


def make_sampler(cfg: DictConfig | None, *, seed_offset: int = 0,
                 search: Search | None = None) -> optuna.samplers.BaseSampler:
    """The sampler of ``hydra.sweeper.sampler`` (``_target_`` and its arguments).

    ``seed_offset`` moves the seed of a sweep that joins a study (not the depth sampler's: its
    plan depends on the study's trials only); ``search`` gives the grid sampler its grid and
    the depth sampler its space and the config's values.
    """
    if cfg is None:
        return optuna.samplers.TPESampler()
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    target = str(kwargs.pop("_target_"))
    kind = _kind(cfg)
    if kwargs.get("seed") is not None and kind != "depth":
        kwargs["seed"] = int(kwargs["seed"]) + seed_offset
    if kind == "grid":
        kwargs["search_space"] = dict(search.grid or {}) if search else {}
    if kind == "depth":
        if search is None:
            raise UserError("the depth sampler needs the search space: build it with "
                            "sweeper.study.search(settings, cfg)")
        kwargs.update(space=dict(search.space.sampled), start=dict(search.start))
    try:
        return instantiate({"_target_": target, **kwargs}, _convert_="all")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown class or argument: the user's config
        raise UserError(f"hydra.sweeper.sampler ({target}) cannot be built: {e}") from None


def make_pruner(cfg: DictConfig | None) -> optuna.pruners.BasePruner:
    """The pruner of ``hydra.sweeper.pruner``; no pruning when it is null."""
    if cfg is None or cfg.get("_target_") is None:
        return optuna.pruners.NopPruner()
    try:
        return instantiate(cfg, _convert_="all")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"hydra.sweeper.pruner cannot be built: {e}") from None




PROGRESS = ("auto", "rich", "log", "none")
DIRECTIONS = ("maximize", "minimize")
# What each hydra.sweeper setting may hold (declared with sweeper.validate's rules).
SETTINGS = (
    Rule("study_name", "str"),
    Rule("storage", "str", hint="a journal file path, or an RDB URL such as "
                                "postgresql://user:password@host/db"),
    Rule("n_trials", "int", low=1, hint="the study's total number of trials"),
    Rule("n_jobs", "int", low=1, hint="trials at once in this sweep"),
    Rule("max_failure_rate", "float", low=0, high=1),
    Rule("failure_rate_min_trials", "int", low=1),
    Rule("heartbeat_interval", "float", low=0, strict=True, hint="seconds"),
    Rule("grace_period", "float", low=0, strict=True, hint="seconds"),
    Rule("retry_lost", "bool"),
    Rule("progress", "choice", choices=PROGRESS),
)


def check_settings(settings: DictConfig, cfg: DictConfig, arguments: Sequence[str] = (),
                   *, storage: bool = True) -> Space:
    """The resolved ``hydra.sweeper`` ``settings`` checked before any trial: each value, the
    objectives, the search space (parsed with the command-line ``arguments``; every searched
    value must be valid for its key: :mod:`sweeper.validate`'s rules, the backbone's units),
    the sampler and pruner, and (``storage``) the Optuna storage reachable. Returns the space.
    """
    for rule in SETTINGS:
        if rule.key in settings:
            rule.check(settings[rule.key], "hydra.sweeper.")
    if float(settings.grace_period) <= float(settings.heartbeat_interval):
        raise UserError(f"hydra.sweeper.grace_period={settings.grace_period} is not longer than "
                        f"hydra.sweeper.heartbeat_interval={settings.heartbeat_interval}: a "
                        "running trial would be declared lost between two heartbeats; make it "
                        "several heartbeats long.")
    objectives = settings.get("objectives")
    if not objectives:
        raise UserError("hydra.sweeper.objectives is empty: name at least one metric of the "
                        "trial (val_acc, train_time_s, test_acc...) and its direction.")
    for name, direction in objectives.items():
        if str(direction) not in DIRECTIONS:
            raise UserError(f"hydra.sweeper.objectives.{name}={direction} is not valid: use "
                            "maximize or minimize.")
    space = parse_space(settings.params or {}, settings.get("conditions") or {}, arguments)
    # With a config group searched (backbone=a,b), each trial's backbone is its own: its unit
    # count is checked by the trial.
    per_trial = any("." not in key.lstrip("+~") for key in space.sampled)
    for key, dist in space.sampled.items():
        _check_searched(cfg, key, _ends(dist), f"hydra.sweeper.params.{key} searches {dist}",
                        per_trial)
    for key, value in space.fixed.items():
        if value is not None:  # None: a ~key deletion
            _check_searched(cfg, key, [_value(value)], f"{key}={value}", per_trial)
    if not _is_grid(settings):  # a grid sampler is built from the space, by the runner
        make_sampler(settings.get("sampler"), search=search(settings, cfg, arguments))
    make_pruner(settings.get("pruner"))
    if storage:
        spec = str(settings.storage)
        with StudyLock(spec, str(settings.study_name))():
            open_storage(spec)
    return space


def _is_grid(settings: DictConfig) -> bool:
    sampler = settings.get("sampler")
    return sampler is not None and str(sampler.get("_target_")).endswith("GridSampler")


def _ends(dist: optuna.distributions.BaseDistribution) -> list[Any]:
    """The values that decide whether a distribution stays valid: its ends, or its choices."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def _value(text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"k={text}").value()


def _check_searched(cfg: DictConfig, key: str, values: Sequence[Any], where: str,
                    per_trial: bool = False) -> None:
    found = rule_for(key.lstrip("+~"))
    for value in values:
        try:
            if found is not None:
                found[1].check(value, found[0])
            if key.lstrip("+~") == "freeze.unfrozen" and not per_trial:
                check_backbone(cfg.backbone, value)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None


def describe(node: DictConfig | None) -> str:
    """A sampler or pruner node in one line, e.g. ``TPESampler(seed=0)`` (``none`` if null)."""
    if node is None or node.get("_target_") is None:
        return "none"
    d = OmegaConf.to_container(node, resolve=True)
    target = str(d.pop("_target_", None)).rsplit(".", 1)[-1]
    return f"{target}(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"
