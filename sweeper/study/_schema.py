"""The ``hydra.sweeper`` settings checked and completed: the one place that validates them.

Every sweep and every job of a study reads its settings through :func:`check_settings`, before any
trial runs (the command line's config check, :class:`sweeper.study.CheckBeforeWork`, runs it
before Hydra creates a folder). The settings are the keys of ``conf/hydra/sweeper/optuna.yaml``
and its groups (sampler, pruner, objectives); any other key is an error, never ignored; each
value is declared with :mod:`sweeper.validate`'s rules (``SETTINGS``). Files written for
Hydra's official Optuna sweeper (and lightning-hydra-template's ``hparams_search``) run: their
keys are honoured (``direction`` with a top-level ``optimized_metric``, ``custom_search_space``,
``storage: null``, ``study_name: null``, an inline sampler) or rejected with the line to write
instead (``search_space``, ``direction`` without a metric).
"""

from __future__ import annotations

import datetime
import inspect
import logging
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_method, get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from sweeper.config import CONF_DIR
from sweeper.errors import UserError
from sweeper.model import check_backbone
from sweeper.storage import StudyLock, open_storage
from sweeper.study._settings import make_pruner, make_sampler, search
from sweeper.study._space import parse_space
from sweeper.trial import RESULTS
from sweeper.validate import Rule, near_miss, rule_for

log = logging.getLogger("sweeper.study")

SWEEPER_CONF = CONF_DIR / "hydra" / "sweeper"
# What storage: null means: a journal in the sweep's own folder, so the study lasts one sweep
# (hydra-optuna-sweeper kept it in memory) while its jobs, report and dashboard can reach it.
SWEEP_JOURNAL = "optuna-journal.log"
DIRECTIONS = ("maximize", "minimize")
PROGRESS = ("auto", "rich", "log", "none")
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
# The official plugin's keys this sweeper does not read, with what to write instead.
_REJECTED = {
    "search_space": "hydra.sweeper.search_space (hydra-optuna-sweeper's form before 1.2) is not "
                    "read here: write the space as params in Hydra's override grammar:",
}


@cache
def _packaged(relative: str) -> DictConfig:
    return OmegaConf.load(SWEEPER_CONF / relative)


def sampler_target(sampler: Any) -> str:
    """The ``_target_`` of a ``hydra.sweeper.sampler`` node (Optuna's TPE when it is null):
    what a study records, and compares, as the sampler it was started with."""
    target = sampler.get("_target_") if sampler is not None else None
    return str(target) if target is not None else "optuna.samplers.TPESampler"


@cache
def _sampler_choices() -> dict[str, str]:
    """The packaged sampler files by their ``_target_``: ``{target: choice}``."""
    found: dict[str, str] = {}
    for path in sorted((SWEEPER_CONF / "sampler").glob("*.yaml")):
        found.setdefault(str(OmegaConf.load(path).get("_target_")), path.stem)
    return found


def sampler_label(target: str) -> str:
    """A sampler's ``_target_`` as the user picks it: ``hydra/sweeper/sampler=grid``."""
    choice = _sampler_choices().get(target)
    return (f"hydra/sweeper/sampler={choice}" if choice is not None
            else f"hydra.sweeper.sampler._target_={target}")


@cache
def known_keys() -> tuple[str, ...]:
    """The settings a ``hydra.sweeper`` node may hold: the keys of the packaged
    ``optuna.yaml`` and the groups its defaults list names."""
    node = _packaged("optuna.yaml")
    groups = [next(iter(d)) for d in node.get("defaults", []) if isinstance(d, Mapping)]
    return tuple(sorted({*(k for k in node if k != "defaults"), *groups}))


def check_settings(settings: DictConfig, cfg: DictConfig, arguments: Sequence[str] = (), *,
                   choices: Mapping[str, Any] | None = None,
                   sweep_dir: str | Path | None = None, storage: bool = True) -> DictConfig:
    """``settings`` (a ``hydra.sweeper`` node) resolved, completed and checked for task ``cfg``
    before any trial; a mistake is a :class:`UserError` saying what to write.

    Completed, for files written for hydra-optuna-sweeper:

    - unknown keys are an error naming the settings (and the nearest one);
    - ``direction`` (hydra-optuna-sweeper's) with a top-level ``optimized_metric`` becomes
      ``objectives: {metric: direction}``; without one it is an error naming ``objectives``;
    - ``params`` null searches ``default_params``; given, it replaces them unless
      ``extend_default_params``;
    - ``storage`` null: a journal in ``sweep_dir`` (this sweep's folder); ``study_name`` null:
      the default name plus the sweep's start time;
    - a sampler or pruner given inline drops the arguments of the group default it replaced
      that it does not take (logged); an argument nobody gave it that it does not take is an
      error;
    - a pruner needs the single objective val_acc (the default study's depth pruner is
      dropped for other objectives, any other pruner is an error);
    - ``custom_search_space`` must name an importable function.

    Checked: each value (``SETTINGS``), ``grace_period`` against ``heartbeat_interval``, the
    objectives, the search space (parsed with the command-line ``arguments``; every value it
    can sample must be valid for its key: :mod:`sweeper.validate`'s rules, the backbone's
    units), the sampler and pruner built, and (``storage``, for a storage the user named) the
    Optuna storage reachable.

    ``choices`` is Hydra's ``hydra.runtime.choices`` (which sampler and pruner files were
    picked). Applying it to its own result changes nothing, so jobs check what their sweep did.
    """
    node = OmegaConf.to_container(settings, resolve=True)
    assert isinstance(node, dict)
    _check_keys(node)
    node["objectives"] = _objectives(node, cfg)
    node["params"] = _params(node)
    named_storage = not _null(node.get("storage"))
    _storage(node, cfg, sweep_dir)
    for group in ("sampler", "pruner"):
        choice = (choices or {}).get(f"hydra/sweeper/{group}")
        node[group] = _arguments(group, node.get(group), choice)
    node["pruner"] = _pruner(node.get("pruner"), node["objectives"])
    hook = node.get("custom_search_space")
    if hook is not None:
        try:
            get_method(str(hook))
        except Exception as e:  # noqa: BLE001 - a path that does not import: the user's config
            raise UserError(f"hydra.sweeper.custom_search_space={hook}: {e}. Name a function "
                            "module.function(cfg, trial) importable in the sweep's "
                            "environment.") from None
    out = OmegaConf.create(node)
    _check_values(out, cfg, arguments)
    if storage and named_storage:  # a null one is a new journal in this sweep's folder
        spec = str(out.storage)
        with StudyLock(spec, str(out.study_name))():
            open_storage(spec)
    return out


def _check_keys(node: dict[str, Any]) -> None:
    for key, why in _REJECTED.items():
        if node.get(key) is not None:
            raise UserError(f"{why}\n{_params_lines(node[key])}")
    known = known_keys()
    unknown = [k for k in node if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            near = near_miss(key, known, cutoff=0.6)
            hints.append(f"{key}" + (f" (did you mean {near}?)" if near else ""))
        verb = "is not a setting" if len(unknown) == 1 else "are not settings"
        raise UserError(
            f"hydra.sweeper: {', '.join(hints)} {verb} of this sweeper. Its settings: "
            f"{', '.join(k for k in known if not k.startswith('_'))} (conf/hydra/sweeper/"
            "optuna.yaml; README, \"Coming from hydra-optuna-sweeper\").")


def _params_lines(search_space: Any) -> str:
    """hydra-optuna-sweeper's ``search_space`` entries as ``params`` lines."""
    lines = ["  params:"]
    for key, d in dict(search_space or {}).items():
        d = dict(d or {})
        kind = str(d.get("type", "")).rsplit(".", 1)[-1]
        if kind == "categorical":
            expr = "choice(" + ", ".join(str(c) for c in d.get("choices") or ()) + ")"
        elif kind == "int" and d.get("step") not in (None, 1) and not d.get("log"):
            step = int(d["step"])
            expr = f"range({int(d['low'])}, {int(d['high']) + step}, {step})"
        elif kind in ("int", "float"):
            low, high = d.get("low"), d.get("high")
            if kind == "int":
                low, high = int(low), int(high)
            expr = f"interval({low}, {high})"
            expr = f"int({expr})" if kind == "int" else expr
            expr = f"tag(log, {expr})" if d.get("log") else expr
        else:
            expr = "..."
        lines.append(f"    {key}: {expr}")
    return "\n".join(lines)


def _objectives(node: dict[str, Any], cfg: DictConfig) -> dict[str, str]:
    direction = node.get("direction")
    metric = OmegaConf.select(cfg, "optimized_metric", default=None)
    if direction is None and metric is None:
        return {str(k): str(v) for k, v in (node.get("objectives") or {}).items()}
    directions = [str(d).rsplit(".", 1)[-1].lower()
                  for d in (direction if isinstance(direction, list | ListConfig) else [direction])]
    metrics = [str(m) for m in (metric if isinstance(metric, list | ListConfig) else [metric])]
    example = dict(zip(metrics if metric is not None else ("val_acc", "train_time_s"),
                       directions if direction is not None else ("maximize", "minimize"),
                       strict=False))
    line = "objectives: {" + ", ".join(f"{k}: {v}" for k, v in example.items()) + "}"
    if direction is None:
        raise UserError(
            f"optimized_metric={metric} without hydra.sweeper.direction: say whether to maximize "
            f"or minimize it (direction: maximize), or write the objectives under hydra.sweeper "
            f"instead:\n  {line}")
    if bad := [d for d in directions if d not in DIRECTIONS]:
        raise UserError(f"hydra.sweeper.direction: {', '.join(bad)} is not one of "
                        f"{', '.join(DIRECTIONS)}.")
    if metric is None:
        raise UserError(
            f"hydra.sweeper.direction={direction if len(directions) > 1 else directions[0]} "
            "does not say which metric to optimise: this sweeper names each one in "
            f"hydra.sweeper.objectives. Write under hydra.sweeper instead:\n  {line}\n(metrics "
            f"a trial returns: {', '.join(RESULTS)}; on the command line: "
            "hydra/sweeper/objectives=accuracy or accuracy_time), or keep "
            "direction and name the metric at the top level as lightning-hydra-template does: "
            f"optimized_metric: {next(iter(example))} (+optimized_metric=... on the command line).")
    if len(metrics) != len(directions):
        raise UserError(
            f"optimized_metric names {len(metrics)} metric(s) ({', '.join(metrics)}) but "
            f"hydra.sweeper.direction gives {len(directions)} direction(s): give one direction "
            "per metric, or write hydra.sweeper.objectives: {metric: direction, ...}.")
    objectives = dict(zip(metrics, directions, strict=True))
    log.info("objectives %s (optimized_metric with hydra.sweeper.direction)", objectives)
    return objectives


def _pruner(pruner: Any, objectives: dict[str, str]) -> Any:
    """The pruner, if the objectives allow it: pruning stops trials on their per-epoch val_acc,
    which Optuna takes in single-objective studies only."""
    if not isinstance(pruner, dict) or pruner.get("_target_") is None:
        return pruner
    if objectives == {"val_acc": "maximize"}:
        return pruner
    if str(pruner["_target_"]).endswith("DepthPruner"):
        # The default study's pruner, which nobody chose for these objectives (accuracy_time,
        # or a file's optimized_metric): trials run to the end.
        log.info("objectives %s: no pruning (the depth pruner compares val_acc, in "
                 "single-objective studies of it)", ", ".join(objectives))
        return {"_target_": None}
    raise UserError(
        "Pruning stops trials on their per-epoch val_acc, so it needs the single "
        f"objective val_acc (maximize); the objectives are {objectives}. Add "
        "hydra/sweeper/objectives=accuracy, or drop the pruner (hydra/sweeper/pruner=none).")


def _params(node: dict[str, Any]) -> dict[str, Any]:
    mine = node.get("params")
    default = node.get("default_params") or {}
    if mine is None:
        return dict(default)
    if node.get("extend_default_params"):
        return {**default, **mine}
    return dict(mine)


def _null(value: Any) -> bool:  # `storage: None` in YAML is the string "None"
    return value is None or str(value).strip().lower() in ("none", "null", "")


def _storage(node: dict[str, Any], cfg: DictConfig, sweep_dir: str | Path | None) -> None:
    if _null(node.get("study_name")):
        # The packaged default name, resolved for this config.
        raw = OmegaConf.to_container(_packaged("optuna.yaml"), resolve=False)["study_name"]
        tree = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=False), "_name": raw})
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        node["study_name"] = f"{tree._name}-{stamp}"
        log.info("study_name: null, so a new study: %s", node["study_name"])
    if _null(node.get("storage")):
        if sweep_dir is None:
            sweep_dir = Path(str(OmegaConf.select(cfg, "paths.multirun"))) / node["study_name"]
        node["storage"] = str(Path(sweep_dir) / SWEEP_JOURNAL)
        log.info("storage: null, so the study lives in this sweep's folder: %s", node["storage"])


def _arguments(group: str, given: Any, choice: str | None) -> Any:
    """An inline sampler or pruner's arguments: those of the group's file it replaced and does
    not take are dropped; any other it does not take is an error."""
    if not isinstance(given, dict) or given.get("_target_") is None:
        return given
    target = str(given["_target_"])
    try:
        cls = get_object(target)
        params = inspect.signature(cls).parameters.values()
    except Exception:  # noqa: BLE001 - make_sampler/make_pruner say what is wrong with it
        return given
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return given
    takes = {p.name for p in params}
    extra = [k for k in given if not k.startswith("_") and k not in takes]
    if not extra:
        return given
    path = SWEEPER_CONF / group / f"{choice}.yaml"
    inherited = _packaged(f"{group}/{choice}.yaml") if choice and path.is_file() else {}
    if inherited and str(inherited.get("_target_")) == target:
        inherited = {}  # the group's own class: nothing it holds was inherited by another
    mistakes = [k for k in extra if k not in inherited]
    name = target.rsplit(".", 1)[-1]
    if mistakes:
        raise UserError(f"hydra.sweeper.{group}: {name} takes no argument "
                        f"{', '.join(mistakes)} (it takes {', '.join(sorted(takes)) or 'none'}).")
    log.info("hydra.sweeper.%s: %s given inline; not passing %s (from the %s %s's settings, "
             "which %s does not take)", group, name, ", ".join(extra), choice, group, name)
    return {k: v for k, v in given.items() if k not in extra}


def _check_values(settings: DictConfig, cfg: DictConfig, arguments: Sequence[str]) -> None:
    """Each completed setting's value, the objectives, the space, the sampler and the pruner."""
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
    if unknown := [str(name) for name in objectives if name not in RESULTS]:
        near = near_miss(unknown[0], RESULTS, cutoff=0.6)
        raise UserError(
            f"{', '.join(unknown)} is not a metric a trial returns"
            + (f" (did you mean {near}?)" if near else "")
            + f": the objectives (hydra.sweeper.objectives, or optimized_metric) can name "
            f"{', '.join(RESULTS)}.")
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
    sampler = settings.get("sampler")
    if sampler is None or not str(sampler.get("_target_")).endswith("GridSampler"):
        # (a grid sampler is built from the space, by the runner)
        make_sampler(sampler, search=search(settings, cfg, arguments))
    make_pruner(settings.get("pruner"))


def _ends(dist: optuna.distributions.BaseDistribution) -> list[Any]:
    """The values that decide whether a distribution stays valid: its ends, or its choices."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def _value(text: str) -> Any:
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
