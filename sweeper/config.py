"""Where the configs are and how code composes and resolves them: ``conf/``, its resolvers,
the task config.

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

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
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


# Resolvers whose value depends only on their arguments (oc.env: and on the environment
# variable, which resolved() compares; sweeper.num_units: on the node it sits in). A config
# that uses any other (now:, oc.select: which names a key in a plain string) is resolved in
# full every time.
_PURE_RESOLVERS = frozenset({"oc.env", "oc.decode", "minus", "plus", "study_budget",
                             "sweeper.num_units"})
_RESOLVER = re.compile(r"\$\{\s*([\w.]+)\s*:")
_REFERENCE = re.compile(r"\$\{\s*(\.*[\w\-]+(?:\.[\w\-]+|\[\d+\])*)\s*\}")
_ENV = re.compile(r"\$\{\s*oc\.env\s*:\s*([^,}\s]+)")


@dataclass(frozen=True)
class _Resolved:
    raw: dict[str, Any]  # a task config's values, unresolved
    tree: dict[str, Any]  # ... resolved (never handed out: callers get copies)
    reads: tuple[tuple[Any, ...], ...]  # every node an interpolation of raw may read
    env: tuple[tuple[str, str | None], ...]  # the variables its oc.env reads, and their values


_last: _Resolved | None = None


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """``cfg``'s task config (:func:`task_config`) resolved into plain dicts and lists: what
    its params (:func:`sweeper.tracking.config_params`) and its YAML (:func:`config_yaml`)
    are made from, so that a trial resolves its config once.

    The trials of a study differ from the last one in a few plain values (the sampled depth,
    learning rates, seed). Where no interpolation reads them, the config resolved last with
    those values set is what resolving again gives, without OmegaConf parsing every
    interpolation again (7.7 ms of a default trial). Anything else (another shape, a changed
    value an interpolation reads or that interpolates itself, a resolver that is not known to
    be pure, another value of an environment variable the config reads) is resolved in full.
    """
    global _last
    task = task_config(cfg)
    raw = OmegaConf.to_container(task, resolve=False, enum_to_str=True)
    last = _last
    if last is not None and all(os.environ.get(k) == v for k, v in last.env):
        changes: list[tuple[tuple[Any, ...], Any]] = []
        if _diff(last.raw, raw, (), changes) and not any(
                _overlap(path, read) for path, _ in changes for read in last.reads):
            tree = copy.deepcopy(last.tree)
            for path, value in changes:
                node = tree
                for step in path[:-1]:
                    node = node[step]
                node[path[-1]] = value
            return tree
    tree = OmegaConf.to_container(task, resolve=True, enum_to_str=True)
    _last = _remember(raw, tree)
    return tree


def _remember(raw: dict[str, Any], tree: dict[str, Any]) -> _Resolved | None:
    found: list[tuple[tuple[Any, ...], str]] = []
    if not _interpolations(raw, (), found):
        return None
    reads, env = [], set()
    for where, text in found:
        resolvers, refs = _RESOLVER.findall(text), _REFERENCE.findall(text)
        if (any(name not in _PURE_RESOLVERS for name in resolvers)
                or text.count("${") != len(resolvers) + len(refs)):
            return None  # a resolver not known to be pure, or a form not followed here
        if "sweeper.num_units" in text:
            reads.append(where[:-1])  # it counts the units of the node it sits in
        names = _ENV.findall(text)
        if any("$" in name for name in names):
            return None  # a variable named by an interpolation
        env.update(names)
        for ref in refs:
            dots = len(ref) - len(ref.lstrip("."))
            steps = tuple(int(s) if s.isdigit() else s
                          for s in ref.lstrip(".").replace("[", ".").replace("]", "").split("."))
            base = () if dots == 0 else where[:len(where) - dots]
            reads.append(base + steps)
    return _Resolved(raw, copy.deepcopy(tree), tuple(reads),
                     tuple((name, os.environ.get(name)) for name in sorted(env)))


def _interpolations(node: Any, path: tuple[Any, ...],
                    found: list[tuple[tuple[Any, ...], str]]) -> bool:
    """Collect every string of ``node`` that may interpolate, with its path; False where a
    key does (not worth following)."""
    if isinstance(node, dict):
        return all(not (isinstance(k, str) and "$" in k) and _interpolations(v, (*path, k), found)
                   for k, v in node.items())
    if isinstance(node, list):
        return all(_interpolations(v, (*path, i), found) for i, v in enumerate(node))
    if isinstance(node, str) and "$" in node:
        found.append((path, node))
    return True


def _diff(old: Any, new: Any, path: tuple[Any, ...],
          changes: list[tuple[tuple[Any, ...], Any]]) -> bool:
    """Collect in ``changes`` the leaves where ``new`` differs from ``old``; False where they
    differ in shape, or a changed leaf is or was a string that may interpolate."""
    if isinstance(old, dict) and isinstance(new, dict):
        return list(old) == list(new) and all(
            _diff(old[k], new[k], (*path, k), changes) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(
            _diff(a, b, (*path, i), changes) for i, (a, b) in enumerate(zip(old, new, strict=True)))
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return False
    if type(old) is type(new) and old == new:
        return True
    if any(isinstance(v, str) and ("$" in v or "\\" in v) for v in (old, new)):
        return False
    changes.append((path, new))
    return True


def _overlap(path: tuple[Any, ...], read: tuple[Any, ...]) -> bool:
    """Whether reading the node at ``read`` may see the leaf at ``path``."""
    n = min(len(path), len(read))
    return [str(step) for step in path[:n]] == [str(step) for step in read[:n]]


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
