"""The search space: Hydra override grammar in, Optuna distributions and trial overrides out.

A space is written as users of hydra-optuna-sweeper write it, ``{key: expression}`` with
``int(interval(0, 9))``, ``tag(log, interval(1e-4, 1e-1))``, ``choice(a, b)``, ``a,b``,
``range(0, 10, 2)`` or a plain value (fixed for every trial). Sweep overrides given on the
command line join (and replace) the configured ones. A condition such as
``{"optim.lr_backbone": "freeze.unfrozen > 0"}`` samples a parameter only when it holds.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from sweeper.errors import UserError

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt,
}
_CONDITION = re.compile(r"^\s*(\S+)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Condition:
    """``key op value``: the parameter is sampled only when this holds."""

    key: str
    op: str
    value: Any

    def holds(self, actual: Any) -> bool:
        try:
            return _OPS[self.op](actual, self.value)
        except TypeError:
            return _OPS[self.op](str(actual), str(self.value))

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.value}"


@dataclass
class Space:
    """Sampled parameters (in sampling order), fixed ones, and conditions on sampled ones."""

    sampled: dict[str, BaseDistribution] = field(default_factory=dict)
    # Override text by key; None for a ``~key`` deletion given without a value.
    fixed: dict[str, str | None] = field(default_factory=dict)
    conditions: dict[str, Condition] = field(default_factory=dict)

    def describe(self) -> dict[str, str]:
        """One human-readable line per parameter (MLflow params of the study run)."""
        out = {k: _describe(d) + (f" if {self.conditions[k]}" if k in self.conditions else "")
               for k, d in self.sampled.items()}
        out.update({k: "deleted" if v is None else f"fixed {v}" for k, v in self.fixed.items()})
        return out

    def grid(self) -> tuple[dict[str, list[Any]], list[str]]:
        """Every value of each discrete parameter, and the continuous ones a grid cannot cover."""
        grid: dict[str, list[Any]] = {}
        skipped: list[str] = []
        for name, dist in self.sampled.items():
            if isinstance(dist, CategoricalDistribution):
                grid[name] = list(dist.choices)
            elif isinstance(dist, IntDistribution) and not dist.log:
                grid[name] = list(range(dist.low, dist.high + 1, dist.step))
            else:
                skipped.append(name)
        return grid, skipped

    def restrict(self, names: Sequence[str]) -> Space:
        """The same space sampling only ``names`` (the others keep the config's values)."""
        return Space({k: d for k, d in self.sampled.items() if k in names}, dict(self.fixed),
                     {k: c for k, c in self.conditions.items() if k in names})

    def suggest(self, trial: optuna.Trial, base: Callable[[str], Any],
                extend: Callable[[optuna.Trial], None] | None = None) -> list[str]:
        """Sample ``trial``'s parameters; return them, and the fixed ones, as Hydra overrides.

        ``base(key)`` gives a key's value in the config, for conditions on unsampled keys;
        ``extend(trial)`` (``custom_search_space``) may suggest more parameters once these are
        sampled, and every one it suggests becomes an override too.
        """
        values: dict[str, Any] = {}
        for name, dist in self.sampled.items():
            cond = self.conditions.get(name)
            if cond is not None:
                ref = values.get(cond.key, self.fixed.get(cond.key))
                if ref is None and cond.key not in self.sampled:
                    ref = base(cond.key)
                if ref is None or not cond.holds(ref):
                    continue
            values[name] = _suggest(trial, name, dist)
        if extend is not None:
            extend(trial)
            values.update({k: v for k, v in trial.params.items()
                           if k not in values and k not in self.fixed})
        return [*(f"{k}={_format(v)}" for k, v in values.items()),
                *(k if v is None else f"{k}={v}" for k, v in self.fixed.items())]


def parse_space(params: Mapping[str, Any], conditions: Mapping[str, str] | None = None,
          arguments: Sequence[str] = ()) -> Space:
    """The space of ``params`` (key -> override expression) with command-line ``arguments``.

    A command-line sweep (``freeze.unfrozen=0,2,4``) replaces the configured expression for
    its key; a plain command-line value fixes that key for every trial.
    """
    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in params.items()]
    try:
        configured = parser.parse_overrides(lines)
        given = parser.parse_overrides(list(arguments))
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors name the bad line
        raise UserError(f"The search space cannot be parsed: {e}") from None
    space = Space()
    by_key: dict[str, Override] = {o.get_key_element(): o for o in configured}
    for o in given:
        key = o.get_key_element()
        by_key.pop(key, None)
        by_key[key] = o
    for key, o in by_key.items():
        if o.is_sweep_override():
            space.sampled[key] = _distribution(key, o)
        elif o.is_delete() and o.value_type is None:
            space.fixed[key] = None  # ``~key``: deleted whatever its value
        else:
            space.fixed[key] = o.get_value_element_as_str()
    for key, text in (conditions or {}).items():
        m = _CONDITION.match(str(text))
        if m is None:
            raise UserError(f"hydra.sweeper.conditions.{key}={text!r}: write it as "
                            "'other.key > 0' (operators > >= < <= == !=).")
        ref, op, value = m.groups()
        if key not in space.sampled:
            continue  # fixed or absent: nothing to condition
        space.conditions[key] = Condition(ref, op, _number(value))
    # Sample what conditions refer to first.
    refs = {c.key for c in space.conditions.values()}
    space.sampled = dict(sorted(space.sampled.items(),
                                key=lambda kv: (kv[0] in space.conditions, kv[0] not in refs)))
    return space


def _distribution(key: str, o: Override) -> BaseDistribution:
    sweep = o.value()
    if isinstance(sweep, IntervalSweep):
        log = "log" in sweep.tags
        start, end = sweep.start, sweep.end
        if isinstance(start, int) and isinstance(end, int):
            return IntDistribution(start, end, log=log)
        return FloatDistribution(float(start), float(end), log=log)
    if isinstance(sweep, RangeSweep):
        values = list(o.sweep_iterator())
        if all(isinstance(v, int) for v in values) and len(values) > 1:
            step = values[1] - values[0]
            if step > 0:
                return IntDistribution(values[0], values[-1], step=step)
        return CategoricalDistribution(values)
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(list(o.sweep_iterator()))
    raise UserError(f"hydra.sweeper.params.{key}: {o.get_value_element_as_str()} is not an "
                    "interval, range or choice.")


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    assert isinstance(dist, CategoricalDistribution)
    return trial.suggest_categorical(name, dist.choices)


def _describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "choice(" + ", ".join(map(str, dist.choices)) + ")"
    kind = "int" if isinstance(dist, IntDistribution) else "float"
    text = f"{kind}({dist.low}..{dist.high}"
    if dist.step not in (None, 1):
        text += f", step {dist.step}"
    return text + (", log)" if dist.log else ")")


def quote(text: str) -> str:
    """``text`` as a quoted value in Hydra's override grammar."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _format(value: Any) -> str:
    """A sampled value as Hydra override text (floats keep full precision)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and re.search(r"[\s,=()\[\]{}'\"\\:]", value):
        return quote(value)
    return str(value)


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
