"""Which freeze depth to recommend, and how sure: the one rule that the default study's sampler
(what to measure next) and the report (what to recommend) share.

Each depth is an *arm*. Its trials differ in their *setting* (the learning rates and any other
searched value) and in their *repeat key* (``trainer.seed``, ``dataset.split_seed``). The rule:

1. **Setting.** An arm's setting is that of its best trial on the *search key*, the repeat key
   of the study's first trial (the config's seed and split: where the learning rates are
   searched); an arm without a trial there takes its best trial's. The arm's *measurements*
   are its complete trials at that setting, one per repeat key.
2. **Interval.** Per arm, the mean validation accuracy of its measurements with a two-sided
   ``confidence`` (95%) Student-t interval; a single measurement gets the Wilson interval of a
   proportion over the validation images (val-set sampling only).
3. **Reference.** The arm with the highest mean (ties: more measurements, then cheaper).
4. **Difference.** For every other arm, its accuracy minus the reference's, with a
   ``confidence`` interval: paired by repeat key when at least two keys are common (t interval of
   the paired differences: the same seed and split cancel out), else Welch's interval when both
   arms have two or more measurements, else a normal interval from the two binomial standard
   errors (Agresti-Caffo).
5. **Status.** ``within`` tolerance when the interval's lower end is above ``-tolerance``;
   ``worse`` when its upper end is below ``-tolerance``; else ``undecided``. The reference is
   within.
6. **Recommendation.** The cheapest arm that is within: fewer unfrozen units is cheaper (every
   unfrozen unit adds its forward and backward pass to every step; the report's arms over
   freeze strategies cost the mean number of units that train per step). The answer is *settled*
   when every cheaper arm is worse, and at least one cheaper arm was measured unless the
   recommendation is the cheapest arm there is (a study of one depth compares nothing cheaper);
   otherwise the undecided ones are named with the repeats
   that would settle each: the smallest ``n`` with ``t(n-1) * s / sqrt(n)`` below the distance of
   the mean difference from ``-tolerance`` (``s``: the standard deviation of the paired
   differences, or pooled over the arms that have one).

A lower end above ``-tolerance`` of a two-sided 95% interval is a one-sided non-inferiority test at
the 2.5% level. Accuracies are fractions; ``tolerance`` is in accuracy points (1.0 = 0.01).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from statistics import fmean, stdev
from typing import Any

from scipy import stats

Key = tuple[Any, ...]  # a repeat key: (trainer.seed, dataset.split_seed)
Setting = tuple[tuple[str, Any], ...]  # sorted (param, value) pairs: learning rates and the like

WITHIN, WORSE, UNDECIDED, REFERENCE, UNMEASURED = (
    "within", "worse", "undecided", "reference", "unmeasured")
MAX_MORE = 200  # beyond this many repeats, "more than 200": the difference sits on the boundary


@dataclass(frozen=True)
class Measurement:
    """One trial of an arm: its setting, repeat key and validation accuracy.

    ``val_acc`` is None for a trial that did not complete (pruned or failed): it loses the
    setting search and is no measurement. ``order`` is the trial's number (the first trial's
    key is the search key; ties go to the earlier trial).
    """

    arm: Hashable
    setting: Setting
    key: Key
    val_acc: float | None
    val_images: int | None = None
    order: int = 0


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    kind: str  # "t", "wilson", "paired", "welch", "binomial", "none"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass
class ArmSummary:
    """One arm under the rule: its setting, measurements, interval and status."""

    arm: Hashable
    setting: Setting | None
    values: dict[Key, float]  # measurements at the setting, by repeat key
    interval: Interval | None
    val_images: int | None
    diff: Interval | None = None  # this arm minus the reference (accuracy fractions)
    status: str = UNMEASURED
    more: int | None = None  # repeats that would settle an undecided arm (None: unknown)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return self.interval.mean if self.interval else math.nan


@dataclass
class Decision:
    """The rule applied to a set of measurements (see the module docstring)."""

    arms: dict[Hashable, ArmSummary]  # in cost order, cheapest first
    tolerance: float  # accuracy points
    confidence: float
    search_key: Key | None
    reference: Hashable | None = None
    recommended: Hashable | None = None
    settled: bool = False
    undecided: list[Hashable] = field(default_factory=list)  # cheaper than recommended
    # Cheaper arms exist (``cheapest`` was not measured) but none was: nothing was compared
    uncompared: bool = False

    def summary(self, arm: Hashable) -> ArmSummary:
        return self.arms[arm]


@functools.lru_cache(maxsize=4096)
def _t(confidence: float, df: float) -> float:
    return float(stats.t.ppf((1 + confidence) / 2, df))


@functools.lru_cache(maxsize=64)
def _z(confidence: float) -> float:
    return float(stats.norm.ppf((1 + confidence) / 2))


def _floor(sd: float, val_images: int | None) -> float:
    """A standard deviation no smaller than the accuracy's resolution (one val image): two
    repeats that happen to agree to the image do not make a zero-width interval."""
    return max(sd, 1.0 / val_images if val_images else 1e-3)


def mean_interval(values: list[float], confidence: float, val_images: int | None) -> Interval:
    """The mean with a t interval (n >= 2) or, for one value, a Wilson interval over the
    ``val_images`` validation images (val-set sampling only)."""
    n = len(values)
    mean = fmean(values)
    if n >= 2:  # an accuracy lies in [0, 1]; so does its interval
        half = _t(confidence, n - 1) * _floor(stdev(values), val_images) / math.sqrt(n)
        return Interval(mean, max(mean - half, 0.0), min(mean + half, 1.0), n, "t")
    if not val_images:
        return Interval(mean, math.nan, math.nan, 1, "none")
    z, m = _z(confidence), val_images
    centre = (mean + z * z / (2 * m)) / (1 + z * z / m)
    half = z / (1 + z * z / m) * math.sqrt(mean * (1 - mean) / m + z * z / (4 * m * m))
    return Interval(mean, centre - half, centre + half, 1, "wilson")


def difference(a: ArmSummary, ref: ArmSummary, confidence: float) -> Interval:
    """``a`` minus ``ref``: paired over common keys, else Welch, else binomial (rule step 4)."""
    common = [k for k in a.values if k in ref.values]
    if len(common) >= 2:
        d = [a.values[k] - ref.values[k] for k in common]
        n = len(d)
        half = _t(confidence, n - 1) * _floor(stdev(d), a.val_images) / math.sqrt(n)
        return Interval(fmean(d), fmean(d) - half, fmean(d) + half, n, "paired")
    va, vr = list(a.values.values()), list(ref.values.values())
    diff = fmean(va) - fmean(vr)
    if len(va) >= 2 and len(vr) >= 2:
        sa = _floor(stdev(va), a.val_images) ** 2 / len(va)
        sr = _floor(stdev(vr), ref.val_images) ** 2 / len(vr)
        df = (sa + sr) ** 2 / (sa ** 2 / (len(va) - 1) + sr ** 2 / (len(vr) - 1))
        half = _t(confidence, df) * math.sqrt(sa + sr)
        return Interval(diff, diff - half, diff + half, min(len(va), len(vr)), "welch")
    if not a.val_images or not ref.val_images:
        return Interval(diff, math.nan, math.nan, 1, "none")
    # Agresti-Caffo: one success and one failure added to each proportion, so that an accuracy
    # of 1.0 still has a spread.
    se = 0.0
    for values, m in ((va, a.val_images), (vr, ref.val_images)):
        p = (fmean(values) * m + 1) / (m + 2)
        se += p * (1 - p) / ((m + 2) * len(values))
    half = _z(confidence) * math.sqrt(se)
    return Interval(diff, diff - half, diff + half, 1, "binomial")


def repeats_to_settle(diff: Interval, sd: float | None, tolerance: float,
                      confidence: float) -> int | None:
    """More paired repeats that would put ``diff``'s interval clear of ``-tolerance`` if its
    mean and spread stay as they are (None when there is no spread to go by)."""
    if sd is None or not math.isfinite(diff.mean):
        return None
    gap = abs(diff.mean + tolerance / 100)
    for n in range(2, MAX_MORE + 2):
        if _t(confidence, n - 1) * sd / math.sqrt(n) < gap:
            have = diff.n if diff.kind == "paired" else 0
            return max(n - have, 1)
    return MAX_MORE + 1


def _setting_of(trials: list[Measurement], search_key: Key | None) -> Setting | None:
    """Rule step 1: the setting of the arm's best trial on the search key (else its best)."""
    done = [m for m in trials if m.val_acc is not None]
    on_key = [m for m in done if m.key == search_key]
    pool = on_key or done
    if not pool:
        return None
    return max(pool, key=lambda m: (m.val_acc, -m.order)).setting


def decide(measurements: Iterable[Measurement], tolerance: float = 1.0,
           confidence: float = 0.95, cost: Callable[[Hashable], Any] = lambda arm: arm,
           arms: Iterable[Hashable] = (), cheapest: Hashable | None = None) -> Decision:
    """Apply the rule (module docstring) to ``measurements``; ``cost`` orders the arms (default:
    the arm itself, the number of unfrozen units); ``arms`` adds arms without measurements.
    ``cheapest`` is the cheapest arm there is (depth 0): a recommendation that is not it, with
    no cheaper arm measured, compared nothing cheaper and is not settled (``uncompared``)."""
    ms = sorted(measurements, key=lambda m: m.order)
    search_key = ms[0].key if ms else None
    by_arm: dict[Hashable, list[Measurement]] = {a: [] for a in arms}
    for m in ms:
        by_arm.setdefault(m.arm, []).append(m)
    summaries: dict[Hashable, ArmSummary] = {}
    for arm in sorted(by_arm, key=cost):
        trials = by_arm[arm]
        setting = _setting_of(trials, search_key)
        values: dict[Key, float] = {}
        images = None
        for m in trials:
            if m.setting == setting and m.val_acc is not None and m.key not in values:
                values[m.key] = m.val_acc
                images = images or m.val_images
        interval = mean_interval(list(values.values()), confidence, images) if values else None
        summaries[arm] = ArmSummary(arm, setting, values, interval, images)
    decision = Decision(summaries, tolerance, confidence, search_key)
    measured = [s for s in summaries.values() if s.n]
    if not measured:
        return decision
    # Means equal to the val image count as ties (float sums of the same accuracies may differ
    # in the last bit).
    ref = max(measured, key=lambda s: (round(s.mean, 9), s.n, -_rank(summaries, s.arm)))
    decision.reference = ref.arm
    ref.status = REFERENCE
    tol = tolerance / 100
    for s in measured:
        if s is ref:
            continue
        s.diff = difference(s, ref, 2 * confidence - 1)  # low, high: one-sided bounds
        if s.diff.low > -tol:
            s.status = WITHIN
        elif s.diff.high < -tol:
            s.status = WORSE
        else:
            s.status = UNDECIDED
    pooled = pooled_sd(summaries.values(), ref)
    for s in measured:
        if s.status == UNDECIDED:
            s.more = repeats_to_settle(s.diff, _sd(s, ref) or pooled, tolerance,
                                       2 * confidence - 1)
    order = list(summaries)
    pick = next(s for s in summaries.values() if s.status in (WITHIN, REFERENCE))
    decision.recommended = pick.arm
    cheaper = [summaries[a] for a in order[:order.index(pick.arm)]]
    decision.undecided = [s.arm for s in cheaper if s.status in (UNDECIDED, UNMEASURED)]
    decision.uncompared = (cheapest is not None and pick.arm != cheapest
                           and not any(s.n for s in cheaper))
    decision.settled = not decision.undecided and not decision.uncompared
    return decision


def _rank(summaries: Mapping[Hashable, ArmSummary], arm: Hashable) -> int:
    return list(summaries).index(arm)


def _sd(s: ArmSummary, ref: ArmSummary) -> float | None:
    """The standard deviation of ``s``'s paired differences to ``ref`` (two or more pairs)."""
    common = [k for k in s.values if k in ref.values]
    if s is ref or len(common) < 2:
        return None
    return _floor(stdev([s.values[k] - ref.values[k] for k in common]), s.val_images)


def pooled_sd(summaries: Iterable[ArmSummary], ref: ArmSummary) -> float | None:
    """The paired differences' standard deviation pooled over the arms that have two or more
    pairs with the reference; without any, that of two independent binomial accuracies (an
    upper bound: a shared split makes the val-set noise cancel)."""
    num = den = 0.0
    for s in summaries:
        sd = _sd(s, ref)
        if sd is not None:
            common = sum(k in ref.values for k in s.values)
            num += (common - 1) * sd ** 2
            den += common - 1
    if den:
        return math.sqrt(num / den)
    if not ref.val_images or not ref.n:
        return None
    p = ref.mean
    return math.sqrt(2 * p * (1 - p) / ref.val_images)
