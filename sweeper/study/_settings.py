"""The sweep's settings (the ``hydra.sweeper`` node) and the Optuna objects they describe.

The Hydra sweeper and :func:`sweeper.study.optimize` read the same node
(``conf/hydra/sweeper/optuna.yaml``), resolved against the task config, and build the
sampler and pruner it names here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sweeper.config import compose
from sweeper.errors import UserError

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
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        OmegaConf.update(out, o.key_or_group, o.value(), merge=True)
    OmegaConf.set_struct(out, True)
    return out


def make_sampler(cfg: DictConfig | None, *, seed_offset: int = 0,
                 grid: Mapping[str, list[Any]] | None = None) -> optuna.samplers.BaseSampler:
    """The sampler of ``hydra.sweeper.sampler`` (``_target_`` and its arguments)."""
    if cfg is None:
        return optuna.samplers.TPESampler()
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    target = str(kwargs.pop("_target_"))
    if kwargs.get("seed") is not None:
        kwargs["seed"] = int(kwargs["seed"]) + seed_offset
    if target.endswith("GridSampler"):
        kwargs["search_space"] = dict(grid or {})
    try:
        return instantiate({"_target_": target, **kwargs}, _convert_="all")
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
