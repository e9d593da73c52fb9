"""Where the configs are and how code composes them: ``conf/``, its resolvers, the task config.

``conf/`` is the one place that decides defaults, paths (``conf/paths``) and unit counts
(``backbone.num_units``: written in ``conf/backbone/<family>.yaml`` for the six hand-cut
families, derived from the model by the ``sweeper.num_units`` resolver of
:mod:`sweeper.model` for the others); code that needs one of them outside a Hydra entry point
composes the config here rather than repeating the value.

Where ``conf/`` is, decided here and nowhere else: it lives at the top of the repository and
ships inside the package as ``sweeper.conf`` (``pyproject.toml`` maps the folder there, for a
wheel and for an editable install alike), so Hydra finds it through its package search path
``pkg://sweeper.conf`` from any folder. A user's ``--config-dir`` or ``hydra.searchpath``
adds folders beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf._utils import get_omega_conf_dumper  # OmegaConf.to_yaml's dumper

CONF_PACKAGE = "sweeper.conf"
try:
    # The packaged configs: a checkout's conf/ (editable install) or site-packages/sweeper/conf.
    CONF_DIR = Path(str(resources.files(CONF_PACKAGE)))
    CONFIG_PATH = f"pkg://{CONF_PACKAGE}"  # what @hydra.main and compose() search first
except ModuleNotFoundError:  # a checkout on PYTHONPATH, not installed: its conf/ folder
    CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
    CONFIG_PATH = str(CONF_DIR)

# Config arithmetic: unfrozen = num_units - transferred (conf/treatment/), and the end of an
# inclusive range of depths (conf/experiment/yosinski.yaml).
OmegaConf.register_new_resolver("minus", lambda a, b: int(a) - int(b), replace=True)
OmegaConf.register_new_resolver("plus", lambda a, b: int(a) + int(b), replace=True)
# The default study's total (conf/hydra/sweeper/optuna.yaml: n_trials): lr_trials learning-rate
# trials for every depth 0..num_units (at most max_depths of them), plus the repeats.
OmegaConf.register_new_resolver(
    "study_budget", lambda num_units, lr_trials, repeats, max_depths:
    min(int(num_units) + 1, int(max_depths)) * int(lr_trials) + int(repeats), replace=True)


def compose(name: str = "config", overrides: Sequence[str] = (), *,
            return_hydra_config: bool = False) -> DictConfig:
    """``conf/<name>.yaml`` composed with Hydra ``overrides``, as an entry point would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    if CONFIG_PATH.startswith("pkg://"):
        init = initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3")
    else:
        init = initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
    with init:
        return hydra_compose(name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """``cfg``'s task config (:func:`task_config`) resolved into plain dicts and lists: what
    its params (:func:`sweeper.tracking.config_params`) and its YAML (:func:`config_yaml`)
    are made from, so that a trial resolves its config once."""
    return OmegaConf.to_container(task_config(cfg), resolve=True, enum_to_str=True)


class _Dumper(getattr(yaml, "CDumper", yaml.Dumper)):  # type: ignore[misc]
    """OmegaConf's YAML dumper on LibYAML's emitter, where PyYAML has it: the same
    representation (strings that read as bools or numbers quoted), emitted in C."""


_Dumper.add_representer(str, get_omega_conf_dumper().str_representer)


def yaml_text(tree: Any) -> str:
    """A config's plain containers as YAML, as ``OmegaConf.to_yaml`` writes them (same
    options, same quoting, the same data read back) but about three times faster: a trial
    writes four such files (its ``.hydra/`` files and its MLflow ``config.yaml``). Only how a
    long quoted string folds across lines may differ."""
    return yaml.dump(tree, default_flow_style=False, allow_unicode=True, sort_keys=False,
                     Dumper=_Dumper)


def config_yaml(tree: dict[str, Any]) -> str:
    """A :func:`resolved` config as YAML: what ``OmegaConf.to_yaml(cfg, resolve=True)`` writes
    for the config it came from (:func:`yaml_text`)."""
    return yaml_text(tree)


def task_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without its ``hydra`` node: the config a trial sees."""
    if "hydra" not in cfg:
        return cfg
    task = cfg.copy()
    OmegaConf.set_struct(task, False)
    task.pop("hydra")
    OmegaConf.set_struct(task, True)
    return task
