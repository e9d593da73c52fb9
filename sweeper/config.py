"""Where the configs are and how code composes them: ``conf/``, its resolvers, the task config.

``conf/`` is the one place that decides defaults, paths (``conf/paths``) and unit counts
(``conf/backbone/<name>.yaml: num_units``); code that needs one of them outside a Hydra entry
point composes the config here rather than repeating the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

# Config arithmetic: unfrozen = num_units - transferred (conf/treatment/), and the end of an
# inclusive range of depths (conf/experiment/yosinski.yaml).
OmegaConf.register_new_resolver("minus", lambda a, b: int(a) - int(b), replace=True)
OmegaConf.register_new_resolver("plus", lambda a, b: int(a) + int(b), replace=True)


def compose(name: str = "config", overrides: Sequence[str] = (), *,
            return_hydra_config: bool = False) -> DictConfig:
    """``conf/<name>.yaml`` composed with Hydra ``overrides``, as an entry point would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def task_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without its ``hydra`` node: the config a trial sees."""
    if "hydra" not in cfg:
        return cfg
    task = cfg.copy()
    OmegaConf.set_struct(task, False)
    task.pop("hydra")
    OmegaConf.set_struct(task, True)
    return task
