"""The sweep's settings (the ``hydra.sweeper`` node) and the Optuna objects they describe.

The Hydra sweeper and :func:`sweeper.study.optimize` read the same node
(``conf/hydra/sweeper/optuna.yaml``), resolved against the task config and checked by
:func:`sweeper.study.check_settings` (``_schema``), and build the sampler and pruner it names
here.
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
from sweeper.study._depth import with_repeats
from sweeper.study._space import Space, parse_space

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


def describe(node: DictConfig | None) -> str:
    """A sampler or pruner node in one line, e.g. ``TPESampler(seed=0)`` (``none`` if null)."""
    if node is None or node.get("_target_") is None:
        return "none"
    d = OmegaConf.to_container(node, resolve=True)
    target = str(d.pop("_target_", None)).rsplit(".", 1)[-1]
    return f"{target}(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"
