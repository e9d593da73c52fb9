"""Freeze strategies over time: which units train at each optimizer step, and at what rate.

``freeze.strategy`` (``conf/freeze/``) is one of

- ``depth``: the last ``unfrozen`` units train for the whole run, the rest stay frozen;
- ``progressive`` (FreezeOut, Brock et al. 2017): the last ``unfrozen`` units train from the
  start and freeze front to back, the first at fraction ``start`` of training and the last at
  ``end``, spaced ``linear``-ly or ``cubic``-ly (FreezeOut's scaled cubic) in between; each
  one's learning rate is cosine-annealed to zero at its freeze step;
- ``gradual`` (ULMFiT; fastai's ``fine_tune``; Lightning's ``BackboneFinetuning``): the head
  alone for ``head_epochs``, then ``units_each`` units unfrozen from the top every ``every``
  epochs, up to ``unfrozen``; a newly unfrozen unit's rate may warm up from ``new_lr_scale``
  of its own over ``every`` epochs.

A :class:`Schedule` is a pure function of the step: the training loop asks it, at the top of
every step, how many units train and what factor each optimizer group's rate gets. Nothing
depends on what happened before, so a trial run again (``sweeper.rerun``, a lost trial
retried by its study) follows the same schedule step for step. The frozen units are always
a prefix (progressive freezes front to back, gradual unfreezes from the top), so "how many
units train" says which ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise

from omegaconf import DictConfig

from sweeper.errors import UserError

STRATEGIES = ("depth", "progressive", "gradual")
# The freeze config's keys every strategy has (conf/freeze/); each strategy's own: PARAMETERS.
FREEZE_KEYS = ("strategy", "unfrozen", "transferred", "bn_stats")
SPACINGS = ("linear", "cubic")
LR_SHAPES = ("cosine", "constant")
#: Each strategy's parameters besides ``unfrozen`` (keys of ``freeze``, as in ``conf/freeze/``).
PARAMETERS = {"depth": (), "progressive": ("start", "end", "spacing"),
              "gradual": ("head_epochs", "every", "units_each", "new_lr_scale")}


@dataclass(frozen=True)
class Schedule:
    """When each backbone unit trains, in optimizer steps, and the learning-rate factors.

    Unit ``i`` trains in steps ``on[i] <= step < off[i]`` (``on[i] == steps``: never; ``off[i]
    == steps``: to the end). A unit that stops before the end is annealed to zero by then.
    """

    strategy: str
    num_units: int
    steps: int  # optimizer steps in the run
    steps_per_epoch: int
    lr_shape: str  # optim.schedule: of the head and of the units that train to the end
    on: tuple[int, ...]
    off: tuple[int, ...]
    ramp_from: float = 1.0  # a unit unfrozen mid-run starts at this share of its rate ...
    ramp_steps: int = 0  # ... and reaches all of it after this many steps
    warmup_steps: int = 0  # every rate rises linearly from 1/warmup_steps of it over these first steps

    def __post_init__(self) -> None:
        for step in sorted({0, *self.on, *self.off} - {self.steps}):
            n = self.unfrozen(step)
            trains = [self.on[i] <= step < self.off[i] for i in range(self.num_units)]
            assert trains == [i >= self.num_units - n for i in range(self.num_units)], \
                f"the trainable units at step {step} are not a suffix"

    def unfrozen(self, step: int) -> int:
        """How many units (the last ones) train at ``step``."""
        return sum(on <= step < off for on, off in zip(self.on, self.off, strict=True))

    def lowest_cut(self) -> int:
        """The fewest units frozen at any step: how deep the run's inputs must start."""
        most = max(self.unfrozen(step) for step in {0, *self.on, *self.off} - {self.steps})
        return self.num_units - most

    def changes(self) -> list[tuple[int, int]]:
        """(step, units trained from that step on), for every step where that changes."""
        out, last = [], None
        for step in sorted({0, *self.on, *self.off} - {self.steps}):
            n = self.unfrozen(step)
            if n != last:
                out.append((step, n))
                last = n
        return out

    def lr_factor(self, unit: int | None, step: int) -> float:
        """What the rate of ``unit``'s optimizer group (``None``: the head) is multiplied by at
        ``step``: ``optim.schedule``'s shape (cosine to zero at the end, or constant), a unit
        that freezes before the end cosine-annealed to zero at its freeze step instead, a
        newly unfrozen unit warmed up; every rate warmed up linearly over the first
        ``warmup_steps`` steps (``optim.warmup_epochs``)."""
        if unit is not None and not self.on[unit] <= step < self.off[unit]:
            return 0.0  # frozen at this step
        if step < self.warmup_steps:
            return self._factor(unit, step) * (step + 1) / self.warmup_steps
        return self._factor(unit, step)

    def _factor(self, unit: int | None, step: int) -> float:
        if unit is not None and self.off[unit] < self.steps:
            return 0.5 * (1.0 + math.cos(math.pi * step / self.off[unit]))
        shape = 1.0 if self.lr_shape == "constant" else 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        if unit is not None and self.ramp_from < 1.0 and self.on[unit] > 0:
            done = min(1.0, (step - self.on[unit]) / max(self.ramp_steps, 1))
            shape *= self.ramp_from + (1.0 - self.ramp_from) * done
        return shape


def strategy_of(freeze: DictConfig) -> str:
    """``freeze.strategy``, checked (configs from before strategies are ``depth``)."""
    strategy = str(freeze.get("strategy", "depth"))
    if strategy not in STRATEGIES:
        raise UserError(f"freeze.strategy={strategy} is not a freeze strategy: use freeze=depth, "
                        "freeze=progressive or freeze=gradual (conf/freeze/).")
    return strategy


def _number(freeze: DictConfig, key: str, kind: type = float) -> float:
    value = freeze.get(key)
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(value)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise UserError(f"freeze.{key}={value} is not {what}.") from None


def check(freeze: DictConfig, num_units: int, epochs: int) -> str:
    """Fail early, with one message saying what to do, on a strategy whose parameters cannot
    work for a backbone of ``num_units`` units trained for ``epochs``; returns the strategy."""
    strategy = strategy_of(freeze)
    unfrozen = _number(freeze, "unfrozen", int)
    if not 0 <= unfrozen <= num_units:
        what = {"depth": "trains the last N units", "progressive": "trains the last N units at "
                "the start", "gradual": "unfreezes at most N units"}[strategy]
        raise UserError(f"freeze.unfrozen={unfrozen} is outside 0..{num_units}: the backbone has "
                        f"{num_units} freeze units (freeze={strategy} {what}).")
    if strategy == "progressive":
        start, end = _number(freeze, "start"), _number(freeze, "end")
        if not 0.0 < start <= 1.0 or not 0.0 < end <= 1.0:
            raise UserError(f"freeze.start={start} and freeze.end={end} are fractions of training: "
                            "each must be in (0, 1] (the first unit freezes at start, the last at end).")
        if end < start:
            raise UserError(f"freeze.end={end} is before freeze.start={start}: the schedule would end "
                            "before it starts. The first unit freezes at start, the last at end; "
                            "give end >= start (1.0: the last unit trains to the end).")
        if str(freeze.get("spacing")) not in SPACINGS:
            raise UserError(f"freeze.spacing={freeze.get('spacing')}: use linear or cubic.")
    if strategy == "gradual":
        head, every, each = (_number(freeze, k, int) for k in ("head_epochs", "every", "units_each"))
        if every < 1 or each < 1:
            raise UserError(f"freeze.every={every} and freeze.units_each={each} must be at least 1 "
                            "(unfreeze units_each units every `every` epochs).")
        if not 0 <= head < epochs:
            raise UserError(f"freeze.head_epochs={head} must be in 0..{epochs - 1} (trainer.epochs="
                            f"{epochs}): after {head} epochs of the head alone no unit would ever be "
                            "unfrozen. Lower it, or train longer.")
        scale = _number(freeze, "new_lr_scale")
        if not 0.0 < scale <= 1.0:
            raise UserError(f"freeze.new_lr_scale={scale} must be in (0, 1]: a newly unfrozen unit "
                            "starts at this share of its learning rate (1.0: all of it at once).")
    return strategy


def check_layer_decay(optim: DictConfig) -> float:
    """``optim.layer_decay``, checked (configs from before it have none: 1.0)."""
    decay = optim.get("layer_decay", 1.0)
    try:
        decay = float(decay)
    except (TypeError, ValueError):
        decay = -1.0
    if not decay > 0.0:
        raise UserError(f"optim.layer_decay={optim.get('layer_decay')} must be a number > 0 "
                        "(1.0: every unit at optim.lr_backbone; 0.75: each unit below the top at "
                        "0.75 of the rate of the unit above it).")
    return decay


def build(freeze: DictConfig, optim: DictConfig, num_units: int, steps_per_epoch: int,
          epochs: int) -> Schedule:
    """The schedule of ``freeze`` (a ``conf/freeze/`` config) for a run of ``epochs`` epochs of
    ``steps_per_epoch`` optimizer steps, for a backbone of ``num_units`` units.

    Example::

        from omegaconf import OmegaConf
        freeze = OmegaConf.create({"strategy": "progressive", "unfrozen": 9, "start": 0.5,
                                   "end": 1.0, "spacing": "linear"})
        s = build(freeze, OmegaConf.create({"schedule": "cosine"}), 9, 8, 10)
        s.unfrozen(0), s.unfrozen(40), s.unfrozen(79)   # (9, 8, 2)
    """
    strategy = check(freeze, num_units, epochs)
    if strategy == "depth":
        return depth_schedule(num_units, int(freeze.unfrozen), optim, steps_per_epoch, epochs)
    lr_shape = _lr_shape(optim)
    steps = steps_per_epoch * epochs
    unfrozen = int(freeze.unfrozen)
    first = num_units - unfrozen  # the first unit the strategy ever trains
    never = [steps] * first  # the units below it: frozen throughout
    if strategy == "progressive":
        start, end = float(freeze.start), float(freeze.end)
        fractions = _spaced(start, end, unfrozen, str(freeze.spacing))
        # A unit freezes at the first step at or after its fraction of training (at least one
        # step in); at the end of training means: it never freezes.
        stops = [min(steps, max(1, math.ceil(f * steps - 1e-9))) for f in fractions]
        on, off = never + [0] * unfrozen, [steps] * first + stops
        return Schedule(strategy, num_units, steps, steps_per_epoch, lr_shape, tuple(on), tuple(off),
                        warmup_steps=warmup_steps(optim, steps_per_epoch))
    head, every, each = int(freeze.head_epochs), int(freeze.every), int(freeze.units_each)
    from_top = [min(epochs, head + every * (r // each)) * steps_per_epoch for r in range(unfrozen)]
    on = never + from_top[::-1]
    return Schedule(strategy, num_units, steps, steps_per_epoch, lr_shape, tuple(on),
                    (steps,) * num_units, float(freeze.new_lr_scale), every * steps_per_epoch,
                    warmup_steps(optim, steps_per_epoch))


def trained_units(freeze: DictConfig, optim: DictConfig, num_units: int, epochs: int) -> int:
    """How many units (the last ones) a run of ``freeze`` ever trains: a trial's trained part
    (:mod:`sweeper.states`) and the model a kept trial is rebuilt as. It does not depend on
    the data: the schedule's epochs and fractions decide it."""
    return num_units - build(freeze, optim, num_units, 1, epochs).lowest_cut()


def depth_schedule(num_units: int, unfrozen: int, optim: DictConfig, steps_per_epoch: int,
                   epochs: int) -> Schedule:
    """The last ``unfrozen`` units train for the whole run (``freeze=depth``)."""
    steps = steps_per_epoch * epochs
    on = [steps] * (num_units - unfrozen) + [0] * unfrozen
    return Schedule("depth", num_units, steps, steps_per_epoch, _lr_shape(optim), tuple(on),
                    (steps,) * num_units, warmup_steps=warmup_steps(optim, steps_per_epoch))


def check_warmup(optim: DictConfig) -> float:
    """``optim.warmup_epochs``, checked (configs from before it have none: 0, no warm-up)."""
    warmup = optim.get("warmup_epochs", 0)
    try:
        warmup = -1.0 if isinstance(warmup, bool) else float(warmup)
    except (TypeError, ValueError):
        warmup = -1.0
    if not warmup >= 0.0:
        raise UserError(f"optim.warmup_epochs={optim.get('warmup_epochs')} must be a number >= 0 "
                        "(0: no warm-up; 0.5: every learning rate rises linearly to its value over "
                        "the first half epoch).")
    return warmup


def warmup_steps(optim: DictConfig, steps_per_epoch: int) -> int:
    """The optimizer steps of ``optim.warmup_epochs``'s linear warm-up (at least one when set)."""
    warmup = check_warmup(optim)
    return max(1, round(warmup * steps_per_epoch)) if warmup > 0 else 0


def _lr_shape(optim: DictConfig) -> str:
    lr_shape = str(optim.get("schedule", "cosine"))
    if lr_shape not in LR_SHAPES:
        raise UserError(f"optim.schedule={lr_shape!r}: use cosine or constant.")
    return lr_shape


def _spaced(start: float, end: float, n: int, spacing: str) -> list[float]:
    """``n`` fractions of training from ``start`` to ``end``: linear, or FreezeOut's scaled
    cubic ((a + (b - a) x)^3 with a^3 = start and b^3 = end: units freeze sooner, more time saved)."""
    xs = [j / (n - 1) if n > 1 else 0.0 for j in range(n)]
    if spacing == "linear":
        return [start + (end - start) * x for x in xs]
    a, b = start ** (1 / 3), end ** (1 / 3)
    return [(a + (b - a) * x) ** 3 for x in xs]


def describe(schedule: Schedule) -> str:
    """The schedule in one line, e.g. ``9 units from step 0, 8 from step 40, ..., 1 from 79``."""
    return ", ".join(f"{n} from step {step}" for step, n in schedule.changes())


def summary(strategy: str, unfrozen: int, values: Mapping[str, object]) -> str:
    """A strategy and its parameters in the user's words, from ``values`` (``freeze``'s keys),
    e.g. ``progressive: the last 9 units train, then freeze from 0.5 to 1 of training (linear)``."""
    if strategy == "progressive":
        return (f"progressive: the last {unfrozen} units train, then freeze from "
                f"{float(values['start']):g} to {float(values['end']):g} of training "
                f"({values['spacing']})")
    if strategy == "gradual":
        scale = float(values.get("new_lr_scale", 1.0))
        return (f"gradual: the head alone for {int(values['head_epochs'])} epochs, then "
                f"{int(values['units_each'])} more units every {int(values['every'])} epochs, "
                f"up to {unfrozen}" + (f" (new units from {scale:g} of their rate)" if scale < 1 else ""))
    return f"depth: the last {unfrozen} units train"


def mean_units(strategy: str, unfrozen: int, num_units: int, epochs: int,
               values: Mapping[str, object]) -> float:
    """How many units train per optimizer step on average over the run: what a configuration
    costs in the rule's currency (:mod:`sweeper.decision`: every unit that trains adds its
    forward and backward pass to the step; a frozen prefix is read from the cache). A fixed
    depth: ``unfrozen``. ``values``: the strategy's parameters (``freeze``'s keys); the run's
    steps are taken as 1000 per epoch (the schedule's fractions of training, not its data)."""
    if strategy == "depth":
        return float(unfrozen)
    from omegaconf import OmegaConf

    freeze = OmegaConf.create({**values, "strategy": strategy, "unfrozen": unfrozen})
    plan = build(freeze, OmegaConf.create({"schedule": "cosine"}), num_units, 1000, epochs)
    changes = [*plan.changes(), (plan.steps, 0)]
    return sum(n * (b[0] - a) for (a, n), b in pairwise(changes)) / plan.steps
