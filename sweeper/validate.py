"""The config checked as a whole before any work: every value's type and range, and the
combinations that cannot work, each failing with one message naming the key, its value and
what would be valid.

The rules are declared once, here (:data:`RULES`, per config group, applied to the trial's
groups and to the source task's under ``source.``); facts they rely on stay where they are
decided and are referenced, not repeated (a dataset kind's settings and size: :mod:`sweeper.data`;
a backbone's units and input: :mod:`sweeper.model`; what names a weights file:
:mod:`sweeper.pretrain`; devices: :mod:`sweeper.device`; cache
modes and dtypes: :mod:`sweeper.feeds`; the tracking store: :mod:`sweeper.tracking`). The
sweep's own settings (``hydra.sweeper``) are checked by :mod:`sweeper.study`.

:func:`check_config` runs before Hydra creates a folder (a Hydra callback,
``sweeper.study.CheckBeforeWork``, listed in ``conf/config.yaml``) and again at the start of
every trial (:func:`sweeper.trial.run_trial`, for configs composed from code): in seconds,
before any data is read, any network pretrained or any cache entry filled.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from sweeper import data as data_mod
from sweeper import schedule
from sweeper.device import resolve_device
from sweeper.errors import UserError
from sweeper.feeds import CACHE_DTYPES, CACHE_MODES, check_cache
from sweeper.model import check_backbone, check_input
from sweeper.pretrain import names_a_file, recipe_of
from sweeper.tracking import check_store

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """What one key may hold: ``kind`` (``int``, ``float``, ``bool``, ``str``, ``choice``,
    ``numbers``), bounds for numbers (``low`` inclusive, or above ``low`` when ``strict``),
    ``choices``, whether null is allowed, and a hint saying what the value means."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    strict: bool = False
    choices: tuple[Any, ...] = ()
    null: bool = False
    hint: str = ""

    def valid(self) -> str:
        """What would be valid, in words."""
        if self.kind == "choice":
            what = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.kind == "bool":
            what = "true or false"
        elif self.kind == "str":
            what = "a non-empty string"
        else:
            noun = {"int": "an integer", "float": "a number",
                    "numbers": "a list of numbers"}[self.kind]
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.strict else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"<= {self.high:g}")
            what = noun + (" " + " and ".join(bounds) if bounds else "")
            if self.kind == "numbers" and bounds:
                what = f"a list of numbers, each {' and '.join(bounds)}"
        if self.null:
            what += ", or null"
        return what + (f" ({self.hint})" if self.hint else "")

    def check(self, value: Any, prefix: str = "") -> None:
        """Raise a :class:`UserError` naming ``prefix + key``, ``value`` and :meth:`valid`
        unless ``value`` fits."""
        if value is None and self.null:
            return
        if not self._fits(value):
            shown = "null" if value is None else value
            raise UserError(f"{prefix}{self.key}={shown} is not valid: use {self.valid()}.")

    def _fits(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices and not (isinstance(value, bool)
                                                  and not any(c is value for c in self.choices))
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and bool(value.strip())
        if self.kind == "numbers":
            items = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
            return bool(items) and all(self._number(v) for v in items)
        return self._number(value)

    def _number(self, value: Any) -> bool:
        x = number(value, integer=self.kind == "int")
        if x is None:
            return False
        if self.low is not None and (x <= self.low if self.strict else x < self.low):
            return False
        return self.high is None or x <= self.high


def number(value: Any, integer: bool = False) -> float | None:
    """``value`` as a finite number (an int where ``integer``), or None when it is not one.
    Strings that the code's ``int()``/``float()`` would read (YAML reads ``1e-3`` as a string)
    count; booleans do not."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if integer and isinstance(value, float) and not value.is_integer():
        return None
    return float(value)


# --- the rules, per config group -------------------------------------------------------------

RULES: dict[str, tuple[Rule, ...]] = {
    "freeze": (
        Rule("unfrozen", "int", low=0, hint="the number of last backbone units trained; "
                                           "0..backbone.num_units"),
        Rule("transferred", "int", low=0, null=True, hint="units that keep pretrained weights"),
        Rule("bn_stats", "choice", choices=("source", "target"),
             hint="source: the pretrained BatchNorm statistics; target: re-estimated on this "
                  "dataset's training images"),
    ),
    "optim": (
        Rule("lr_head", "float", low=0, hint="the new head's learning rate"),
        Rule("lr_backbone", "float", low=0, hint="the trained backbone units' learning rate"),
        Rule("weight_decay", "float", low=0),
        Rule("schedule", "choice", choices=schedule.LR_SHAPES),
        Rule("warmup_epochs", "float", low=0, hint="epochs of linear learning-rate warm-up; "
                                                   "0: none"),
    ),
    "trainer": (
        Rule("epochs", "int", low=1),
        Rule("batch_size", "int", low=1),
        Rule("seed", "int"),
        Rule("deterministic", "bool"),
        Rule("amp", "bool"),
        Rule("num_threads", "int", low=1, null=True, hint="null: torch's default"),
        Rule("compile", "bool"),
    ),
    "dataset": (
        Rule("name", "str"),
        Rule("image_size", "int", low=1, hint="pixels; images are resized to it"),
        Rule("mean", "numbers", hint="one value (grey) or three (RGB)"),
        Rule("std", "numbers", low=0, strict=True, hint="one value (grey) or three (RGB)"),
        Rule("train_per_class", "int", low=1, null=True, hint="null: all"),
        Rule("val_per_class", "int", low=1, null=True, hint="null: all"),
        Rule("test_per_class", "int", low=1, null=True, hint="null: all"),
        Rule("split_seed", "int"),
        Rule("on_bad_image", "choice", choices=data_mod.ON_BAD_IMAGE,
             hint="skip: unreadable images are skipped and counted; fail: the first one stops "
                  "the run"),
        Rule("size", "int", low=2),
        Rule("num_classes", "int", low=2),
        Rule("download", "bool"),
    ),
    "augment": (
        Rule("crop_padding", "int", low=0, hint="pixels; 0: no random crop"),
        Rule("hflip", "bool"),
    ),
    "cache": (
        Rule("mode", "choice", choices=(*CACHE_MODES, True, False)),
        Rule("dtype", "choice", choices=tuple(CACHE_DTYPES)),
        Rule("memory_budget_mb", "float", low=0),
        Rule("device_budget_mb", "float", low=0, null=True,
             hint="null: half the GPU memory free to the trial"),
        Rule("dir", "str"),
    ),
    "tracking": (
        Rule("experiment", "str"),
        Rule("uri", "str"),
    ),
}
# The source task of backbone.weights=source has groups of its own (conf/source/).
SOURCE_GROUPS = ("dataset", "optim", "trainer")
# The keys code reads in the groups whose keys are fixed (the rules' and those checked
# elsewhere). A key of one's own may be added (``+trainer.note=x``: logged as a param, read by
# nothing), but not one a setting's name is a near miss of: that is a typo, whose value would
# be ignored (``+trainer.epoch=3`` trains trainer.epochs).
SETTINGS: dict[str, tuple[str, ...]] = {
    "trainer": (*(r.key for r in RULES["trainer"]), "device"),
    "optim": (*(r.key for r in RULES["optim"]), "layer_decay", "optimizer"),
    "freeze": tuple(dict.fromkeys((*(r.key for r in RULES["freeze"]), *schedule.FREEZE_KEYS,
                                   *(k for ks in schedule.PARAMETERS.values() for k in ks)))),
}


def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``, or ``_ABSENT`` when the config does not have it (or it
    is ``???``: the check that needs it says what to set)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent or OmegaConf.is_missing(parent, leaf):
        return _ABSENT
    value = parent[leaf]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def rule_for(key: str) -> tuple[str, Rule] | None:
    """The rule of a dotted config key (``optim.lr_head``, ``source.trainer.epochs``) and the
    prefix of its group, if one is declared."""
    prefix = "source." if key.startswith("source.") else ""
    group, _, leaf = key.removeprefix(prefix).partition(".")
    if prefix and group not in SOURCE_GROUPS:
        return None
    for rule in RULES.get(group, ()):
        if rule.key == leaf:
            return f"{prefix}{group}.", rule
    return None


def near_miss(key: str, settings: tuple[str, ...] | list[str], cutoff: float = 0.8) -> str | None:
    """The setting ``key`` is most likely a typo of, if it is close enough to one (``cutoff``,
    difflib's similarity: 0.8 is close enough to refuse a key as a typo; a message that already
    refuses it may offer a looser guess)."""
    close = difflib.get_close_matches(key, [s for s in settings if s != key], n=1, cutoff=cutoff)
    return close[0] if close else None


def check_rules(cfg: DictConfig, group: str, prefix: str = "") -> None:
    """``cfg[group]``'s values against :data:`RULES` (keys it does not have are skipped), and
    its added keys against :data:`SETTINGS` (a near miss of a setting is refused)."""
    node = OmegaConf.select(cfg, f"{prefix}{group}") if prefix or group else cfg
    if not isinstance(node, DictConfig):
        return
    settings = SETTINGS.get(group, ())
    for key in (k for k in node if settings and k not in settings):
        meant = near_miss(str(key), settings)
        if meant is not None:
            raise UserError(f"{prefix}{group}.{key} is not a setting (did you mean "
                            f"{prefix}{group}.{meant}?): nothing would read it. Set "
                            f"{prefix}{group}.{meant}=... instead.")
    for rule in RULES[group]:
        value = _get(node, rule.key)
        if value is not _ABSENT:
            rule.check(value, f"{prefix}{group}.")


# --- combinations ----------------------------------------------------------------------------

def _check_dataset(dataset: DictConfig, prefix: str = "") -> None:
    """The dataset's settings (:func:`sweeper.data.check`), its classes, and its split sizes
    against what the dataset holds, where that is known without reading it; a folder dataset's
    root must be a folder (before a run folder and an MLflow run are made for it)."""
    kind = data_mod.check(dataset)
    if data_mod.kind_of(dataset) in data_mod.FOLDER_KINDS:
        data_mod.folder_root(dataset, prefix)
    mean, std = _get(dataset, "mean"), _get(dataset, "std")
    if mean is not _ABSENT and std is not _ABSENT:
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise UserError(f"{prefix}dataset.mean={mean} and {prefix}dataset.std={std}: give one "
                            "value each (grey images) or three each (RGB).")
    classes = _get(dataset, "classes")
    if classes not in (None, _ABSENT):
        rule = Rule("classes", "numbers", low=0, hint="class indices")
        rule.check(classes, f"{prefix}dataset.")
        if any(number(c, integer=True) is None for c in classes):
            raise UserError(f"{prefix}dataset.classes={classes} is not valid: use a list of "
                            "class indices (integers >= 0), or null for all.")
        if len(set(classes)) != len(classes):
            raise UserError(f"{prefix}dataset.classes={classes} names a class twice.")
        if len(classes) < 2:
            raise UserError(f"{prefix}dataset.classes={classes}: a classifier needs at least two "
                            "classes; name two or more, or null for all.")
        if kind.classes is not None and max(classes) >= kind.classes:
            raise UserError(f"{prefix}dataset.classes={classes}: {_kind_name(dataset)} has classes "
                            f"0..{kind.classes - 1}.")
    if kind.per_class is None:
        return
    counts = {k: _get(dataset, k) for k in ("train_per_class", "val_per_class", "test_per_class")}
    test_set = kind.test_per_class is not None
    drawn = ["train_per_class", "val_per_class"] + ([] if test_set else ["test_per_class"])
    need = sum(int(counts[k]) for k in drawn if counts[k] not in (None, _ABSENT))
    if need > kind.per_class:
        asked = " + ".join(f"{prefix}dataset.{k}={counts[k]}" for k in drawn
                           if counts[k] not in (None, _ABSENT))
        raise UserError(f"{asked} asks for {need} images per class; {_kind_name(dataset)} has "
                        f"{kind.per_class} per class in its training set"
                        + ("" if test_set else " (val and test are drawn from it too)")
                        + ": lower those counts.")
    test = counts["test_per_class"]
    if test_set and test not in (None, _ABSENT) and int(test) > kind.test_per_class:
        raise UserError(f"{prefix}dataset.test_per_class={test}: {_kind_name(dataset)}'s test set "
                        f"has {kind.test_per_class} images per class; use at most that, or null "
                        "for all.")


def _kind_name(dataset: DictConfig) -> str:
    return f"dataset {dataset.get('name')} (kind {data_mod.kind_of(dataset)})"


def _check_weights(cfg: DictConfig) -> None:
    """A weights file that is named must exist (read later, with its fit to the backbone)."""
    weights = cfg.backbone.get("weights")
    if weights is None:
        return
    weights = str(weights)
    if weights not in ("none", "source") and names_a_file(weights) and not Path(weights).is_file():
        raise UserError(f"backbone.weights={weights}: no such file. Give the path of a state dict "
                        "saved with torch.save(model.state_dict(), path), or source, none, or "
                        "DEFAULT (the library's pretrained weights).")


def _writable_folder(key: str, folder: str) -> None:
    """``folder`` exists as a writable folder or can be created (its first existing ancestor
    is a writable folder)."""
    path = Path(folder).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: the folder cannot be created through it
            raise UserError(f"{key}={folder} cannot be created: {probe} is a broken link.")
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{key}={folder} cannot be created: {probe} is a file, not a folder. "
                        f"Point {key} at a folder (paths.outputs=... or SWEEPER_OUTPUTS moves "
                        "every folder runs write).")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "cannot be written" if probe == path else f"cannot be created ({probe} is not writable)"
        raise UserError(f"{key}={folder} {what}: point {key} at a folder you can write "
                        "(paths.outputs=... or SWEEPER_OUTPUTS moves every folder runs write).")


def check_paths(cfg: DictConfig) -> None:
    """Every folder runs write (``conf/paths``) and the cache's folder can be written."""
    for key, value in (cfg.get("paths") or {}).items():
        if isinstance(value, str):  # a file's path (mlflow.db): its folder
            folder = str(Path(value).parent) if Path(value).suffix else value
            _writable_folder(f"paths.{key}", folder)
    cache_dir = _get(cfg, "cache.dir")
    if isinstance(cache_dir, str):
        _writable_folder("cache.dir", cache_dir)


COMBINATIONS: tuple[Callable[[DictConfig], None], ...] = (
    lambda cfg: check_backbone(cfg.backbone, cfg.freeze.unfrozen, cfg.freeze.get("transferred")),
    # the freeze strategy's parameters, for this backbone and number of epochs
    lambda cfg: schedule.check(cfg.freeze, int(cfg.backbone.num_units), int(cfg.trainer.epochs)),
    lambda cfg: schedule.check_layer_decay(cfg.optim),
    lambda cfg: _check_dataset(cfg.dataset),
    lambda cfg: check_input(cfg.backbone, int(cfg.dataset.image_size), "dataset.image_size"),
    _check_weights,
    lambda cfg: resolve_device(str(cfg.trainer.device)),
    lambda cfg: check_cache(cfg.get("cache"), data_mod.augment(cfg.get("augment"))),
)


def _check_source(cfg: DictConfig) -> None:
    """The source task's groups, when ``backbone.weights=source`` uses them."""
    if str(cfg.backbone.get("weights")) != "source" or cfg.get("source") is None:
        return
    for group in SOURCE_GROUPS:
        check_rules(cfg, group, "source.")
    _check_dataset(cfg.source.dataset, "source.")
    resolve_device(str(cfg.source.trainer.device))
    recipe_of(cfg.backbone)  # backbone.pretrain: how the backbone is pretrained on it


def check_config(cfg: DictConfig, *, store: bool = True) -> None:
    """Check the task config ``cfg`` as a whole; raise one :class:`UserError` for the first
    mistake found. ``store``: also open the tracking store (which creates it when new)."""
    for group in RULES:
        check_rules(cfg, group)
    for check in COMBINATIONS:
        check(cfg)
    _check_source(cfg)
    check_paths(cfg)
    if store:
        check_store(str(cfg.tracking.uri))
