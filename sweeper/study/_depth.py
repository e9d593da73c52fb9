"""The default study's sampler and pruner: every depth measured, a learning-rate search inside
each depth, then repeats of the depths still in contention, chosen by the report's own rule.

Training time is almost a function of the depth alone, and the question is a comparison
between depths, so the study is planned per depth rather than searched as one space:

1. **Learning-rate search** (``lr_trials`` per depth, on the config's seed and data split):
   every depth once at the config's values of the searched parameters (the learning rates),
   in spread order (0, N, N/2, ...) so that a study cut short still spans the range; then a
   second round, each depth at its own point of a scrambled Sobol sequence over the search
   box (together they cover it evenly); further rounds try the best setting of a neighbouring
   depth (the best learning rates move little from one depth to the next), else a step around
   the depth's own best. :class:`DepthPruner` stops a search trial whose learning curve is
   clearly behind the same depth's earlier trials.
2. **Repeats.** Each depth keeps its best setting; a repeat trains it again with the next
   repeat key (``trainer.seed`` and ``dataset.split_seed`` one higher: another seed and another
   train/val split, which the frozen-prefix cache makes cheap). After every trial the rule of
   :mod:`sweeper.decision` is applied to what is known, and the next trial goes to, in order:
   an unmeasured depth between the cheapest depth still in play and its cheaper measured
   neighbour (only for backbones with more than ``max_depths`` depths, which start from an
   evenly spread subset); the reference and the recommended depth until each has
   ``min_repeats`` repeat keys; the undecided depth (cheaper than the recommendation) expected to
   settle with the fewest more repeats. A repeat is paired: the reference runs every key its
   contenders run. Once nothing cheaper is undecided the answer is settled and the study stops
   (``stop_when_settled``), else it runs to ``n_trials``.

Every decision is a function of the study's trials (their parameters, states and validation
accuracies) and ``seed``: never of measured times, and never of which sweep asks. The same
command on a fresh machine state asks for the same trials in the same order, a resumed study
continues the same plan, and parallel sweeps see each other's running trials as taken.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from sweeper.decision import (
    REFERENCE,
    UNDECIDED,
    WITHIN,
    Decision,
    Measurement,
    decide,
)
from sweeper.errors import UserError
from sweeper.study._space import Space
from sweeper.tracking import Param

log = logging.getLogger("sweeper.study")

DEPTH = str(Param.UNFROZEN)
STRATEGY = "freeze"  # the freeze strategy's config group (conf/freeze/), as a sweep names it
REPEAT_KEYS = (str(Param.SEED), str(Param.SPLIT_SEED))  # the default study's repeat keys
PLAN = "plan"  # trial user attr: why the sampler chose this trial


def spread(depths: Sequence[int]) -> list[int]:
    """``depths`` (sorted) in the order that covers their range soonest: both ends, then
    the middle, then the middles of the halves, and so on."""
    depths = sorted(depths)
    if len(depths) <= 2:
        return depths
    out = [depths[0], depths[-1]]
    gaps = [(0, len(depths) - 1)]
    while gaps:
        nxt = []
        for lo, hi in gaps:
            if hi - lo < 2:
                continue
            mid = (lo + hi) // 2
            out.append(depths[mid])
            nxt += [(lo, mid), (mid, hi)]
        gaps = nxt
    return out


def depth_subset(depths: Sequence[int], max_depths: int) -> list[int]:
    """Every one of ``depths`` (sorted), or ``max_depths`` of them evenly spread (both ends
    included) when there are more."""
    depths = sorted(depths)
    if len(depths) <= max_depths:
        return depths
    return sorted({depths[int(round(i))] for i in np.linspace(0, len(depths) - 1, max_depths)})


def with_repeats(space: Space, repeat_keys: Sequence[str], depth: Any) -> Space:
    """``space`` as the depth sampler samples it: the depth a range (a fixed one, ``depth``,
    is a range of one: its learning-rate search and repeats), and the repeat keys sampled (one
    higher per repeat; a command-line value, ``trainer.seed=5``, is where they start)."""
    out = Space(dict(space.sampled), dict(space.fixed), dict(space.conditions))
    if STRATEGY in out.sampled:  # its arms are depths: a strategy would be a mere setting
        raise UserError("The depth sampler compares the depths of one freeze strategy; to search "
                        "the strategy too (freeze=depth,progressive,gradual), run "
                        "hparams_search=strategies (TPE over the strategies and their "
                        "parameters) or add hydra/sweeper/sampler=grid (every combination; with "
                        "hydra.sweeper.study_name=NAME, a study of its own). "
                        "The report puts each "
                        "(strategy, depth) on its own row either way.")
    if DEPTH not in out.sampled:
        value = out.fixed.pop(DEPTH, depth)
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise UserError(f"The depth sampler needs {DEPTH} as a number or a range, not "
                            f"{value!r}.") from None
        out.sampled = {DEPTH: IntDistribution(value, value), **out.sampled}
    elif not isinstance(out.sampled[DEPTH], IntDistribution):
        raise UserError(f"The depth sampler plans trials per depth: search {DEPTH} as an integer "
                        "range, e.g. 'int(interval(0, 9))' or 'range(0, 10)', or pick another "
                        "sampler (hydra/sweeper/sampler=tpe).")
    for key in repeat_keys:
        if key in out.sampled:
            raise UserError(f"The depth sampler draws {key} itself (one higher per repeat); do "
                            "not search it, or pick another sampler (hydra/sweeper/sampler=tpe).")
        out.fixed.pop(key, None)
        out.sampled[key] = IntDistribution(-(2**31), 2**31 - 1)
    return out


def trial_params(t: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters, also for a queued trial (a retry), whose are fixed ones."""
    return dict(t.params) or dict(t.system_attrs.get("fixed_params", {}))


@dataclass(frozen=True)
class Plan:
    """The next trial: a depth, values for the searched parameters, a repeat index, a reason."""

    depth: int
    values: dict[str, Any]
    repeat: int  # repeat index: 0 = the search key
    round: int  # learning-rate search round (-1 for a repeat)
    why: str


class DepthSampler(BaseSampler):
    """Plans trials per depth (see the module docstring); :class:`optuna.samplers.BaseSampler`.

    ``space`` (parameter -> distribution, including ``depth_param`` and the ``repeat_keys``) and
    ``start`` (the config's value of each) are given by the sweep. ``lr_trials``: learning-rate
    trials per depth; ``min_repeats``: repeat keys the recommended and the reference depth get
    at least; ``max_depths``: backbones with more depths start from an evenly spread subset of
    this many; ``tolerance`` (accuracy points) and ``confidence``: the rule's; ``seed``: the
    scrambled Sobol points of the second round. Parameters it does not know are drawn from a
    generator seeded by the trial's depth and round.
    """

    def __init__(self, space: Mapping[str, BaseDistribution], start: Mapping[str, Any], *,
                 seed: int = 0, lr_trials: int = 2, min_repeats: int = 3, max_depths: int = 21,
                 tolerance: float = 1.0, confidence: float = 0.95, stop_when_settled: bool = True,
                 depth_param: str = DEPTH, repeat_keys: Sequence[str] = REPEAT_KEYS) -> None:
        if not isinstance(space.get(depth_param), IntDistribution):
            raise UserError(f"The depth sampler needs {depth_param} in its space as an integer "
                            f"range (it is {space.get(depth_param)}): build the space with "
                            "sweeper.study.search().")
        self.space = dict(space)
        self.start = dict(start)
        self.seed = int(seed)
        self.lr_trials = max(1, int(lr_trials))
        self.min_repeats = max(1, int(min_repeats))
        self.tolerance = float(tolerance)
        self.confidence = float(confidence)
        self.stop_when_settled = bool(stop_when_settled)
        self.depth_param = depth_param
        self.repeat_keys = tuple(repeat_keys)
        dist = space[depth_param]
        self.all_depths = list(range(dist.low, dist.high + 1, dist.step))
        self.depths = depth_subset(self.all_depths, int(max_depths))
        self.setting_params = [k for k in space if k != depth_param and k not in self.repeat_keys]
        self._plans: dict[int, Plan] = {}
        self._ahead: tuple[tuple, Plan | None] | None = None

    # -- what the sweep asks ---------------------------------------------------------------

    def budget(self, n_trials: int) -> str:
        """What ``n_trials`` buys, in words (logged when the study starts)."""
        search = len(self.depths) * self.lr_trials
        subset = ("" if self.depths == self.all_depths else
                  f" (an evenly spread {len(self.depths)} of {len(self.all_depths)}, refined "
                  "around the answer)")
        text = (f"n_trials={n_trials}: {len(self.depths)} depths{subset} x {self.lr_trials} "
                f"learning-rate trials = {search} trials, then up to {max(n_trials - search, 0)} "
                "repeats (new seed and data split) of the depths in contention")
        if self.stop_when_settled:
            text += "; stops as soon as the answer is settled"
        if n_trials < search + 2 * self.min_repeats:
            text += (f". Too few for repeats: raise hydra.sweeper.n_trials to at least "
                     f"{search + 2 * self.min_repeats}")
        return text

    def done(self, study: optuna.Study) -> str | None:
        """Why the study needs no more trials (the answer is settled), or None."""
        trials = study.get_trials(deepcopy=False)
        plan = self._next(study, exclude=None)
        self._ahead = (_signature(trials), plan)  # what the next ask would compute again
        return None if plan is not None else "the answer is settled"

    def decision(self, study: optuna.Study) -> Decision:
        """The rule applied to the study's trials so far."""
        return self._decide(study.get_trials(deepcopy=False), _val_index(study))

    # -- optuna.samplers.BaseSampler -------------------------------------------------------

    def infer_relative_search_space(self, study, trial):  # noqa: D102 - everything is planned
        return {}

    def sample_relative(self, study, trial, search_space):  # noqa: D102
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        plan = self._plans.get(trial._trial_id)
        if plan is None:
            others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
            ahead = self._ahead
            plan = (ahead[1] if ahead is not None and ahead[0] == _signature(others)
                    else self._next(study, exclude=trial.number))
            self._ahead = None
            if plan is None:  # asked after the answer was settled (another sweep): one more repeat
                plan = self._extra(study, trial.number)
            self._plans[trial._trial_id] = plan
            study._storage.set_trial_user_attr(trial._trial_id, PLAN, plan.why)
        if param_name == self.depth_param:
            return plan.depth
        if param_name in plan.values:
            return _clip(plan.values[param_name], param_distribution)
        rng = np.random.default_rng([self.seed, plan.depth, plan.repeat, plan.round + 1,
                                     zlib.crc32(param_name.encode())])
        return _from_unit(float(rng.random()), param_distribution)

    def after_trial(self, study, trial, state, values):  # noqa: D102
        self._plans.pop(trial._trial_id, None)

    # -- the plan --------------------------------------------------------------------------

    def _key(self, repeat: int) -> dict[str, Any]:
        return {k: int(self.start.get(k, 0)) + repeat for k in self.repeat_keys}

    def _repeat_of(self, params: Mapping[str, Any]) -> int | None:
        if not self.repeat_keys:
            return 0
        k = self.repeat_keys[0]
        return int(params[k]) - int(self.start.get(k, 0)) if k in params else None

    def _setting(self, params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted((k, v) for k, v in params.items()
                            if k != self.depth_param and k not in self.repeat_keys))

    def _decide(self, trials: Sequence[FrozenTrial], val_index: int) -> Decision:
        ms = []
        for t in trials:
            params = trial_params(t)
            if self.depth_param not in params or not t.state.is_finished():
                continue
            done = t.state == TrialState.COMPLETE and t.values is not None
            ms.append(Measurement(
                int(params[self.depth_param]), self._setting(params),
                tuple(params.get(k) for k in self.repeat_keys),
                float(t.values[val_index]) if done else None,
                t.user_attrs.get("val_images"), t.number))
        return decide(ms, self.tolerance, self.confidence)

    def _taken(self, trials: Sequence[FrozenTrial]) -> dict[int, list[dict[str, Any]]]:
        """Per depth, the parameters of its trials in any state (running and queued ones too:
        another worker's trial is taken)."""
        taken: dict[int, list[dict[str, Any]]] = {}
        for t in trials:
            params = trial_params(t)
            if self.depth_param in params:
                taken.setdefault(int(params[self.depth_param]), []).append(params)
        return taken

    def _next(self, study: optuna.Study, exclude: int | None) -> Plan | None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number != exclude]
        taken = self._taken(trials)
        search = {d: [p for p in ps if self._repeat_of(p) == 0] for d, ps in taken.items()}
        decision = self._decide(trials, _val_index(study))
        in_play = sorted(set(self.depths) | set(taken))
        # 1. The learning-rate search, round by round over the depths in play.
        for rnd in range(self.lr_trials):
            for d in spread(in_play):
                if len(search.get(d, [])) == rnd:
                    return self._search(d, rnd, search, trials, study)
        # A refinement between the cheapest depth in play and its cheaper measured neighbour.
        gap = self._gap(decision, in_play)
        if gap is not None:
            return Plan(gap, self._start_values(), 0, 0,
                        f"refine: depth {gap} lies between a depth that is worse and one that is not")
        ref, rec = decision.reference, decision.recommended
        if ref is None:
            return None
        arms, tol = decision.arms, self.tolerance / 100
        # 2. The reference: min_repeats keys, so that one lucky trial does not set the bar.
        if arms[ref].n < self.min_repeats:
            return self._repeat(ref, decision, taken, f"depth {ref} (the reference) needs "
                                f"{self.min_repeats} repeats")
        # 3. The cheapest depth that looks within tolerance but is not shown to be yet.
        cheaper = [arms[d] for d in decision.undecided if arms[d].status == UNDECIDED]
        hopeful = [s for s in cheaper if s.diff is not None and s.diff.mean > -tol]
        if hopeful:
            s = hopeful[0]
            return self._repeat(s.arm, decision, taken,
                                f"depth {s.arm} looks within tolerance of depth {ref} "
                                f"({s.diff.mean * 100:+.2f} points) but is not shown to be")
        # 4. The recommended depth: min_repeats keys for its own interval.
        if arms[rec].n < self.min_repeats:
            return self._repeat(rec, decision, taken, f"depth {rec} (recommended) needs "
                                f"{self.min_repeats} repeats")
        # 5. The cheaper undecided depth that should be shown worse with the fewest repeats.
        if cheaper:
            s = min(cheaper, key=lambda s: (s.more if s.more is not None else math.inf, s.arm))
            return self._repeat(s.arm, decision, taken,
                                f"depth {s.arm} undecided against depth {ref} "
                                f"(about {s.more} more repeats to settle)")
        if self.stop_when_settled:
            return None
        # Settled, budget left: tighten the intervals of the depths within tolerance.
        keep = [s for s in arms.values() if s.status in (WITHIN, REFERENCE)]
        s = min(keep, key=lambda s: (s.n, s.arm))
        return self._repeat(s.arm, decision, taken, f"settled; tightening depth {s.arm}")

    def _extra(self, study: optuna.Study, exclude: int) -> Plan:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number != exclude]
        decision = self._decide(trials, _val_index(study))
        taken = self._taken(trials)
        d = decision.recommended if decision.recommended is not None else self.depths[0]
        return self._repeat(d, decision, taken, f"settled; another repeat of depth {d}")

    def _start_values(self) -> dict[str, Any]:
        return {k: self.start[k] for k in self.setting_params if k in self.start} | self._key(0)

    def _search(self, d: int, rnd: int, search: Mapping[int, list[dict[str, Any]]],
                trials: Sequence[FrozenTrial], study: optuna.Study) -> Plan:
        """Learning-rate trial ``rnd`` of depth ``d`` (module docstring, step 1)."""
        if rnd == 0:
            return Plan(d, self._start_values(), 0, 0,
                        f"learning-rate search of depth {d}: the config's values")
        idx = _val_index(study)
        if rnd == 1:
            gain = self._best_gain(d, trials, idx)
            if gain is not None:
                return Plan(d, gain[2] | self._key(0), 0, 1,
                            f"learning-rate search of depth {d}: the values that gained "
                            f"{gain[0] * 100:+.1f} points at depth {gain[1]}")
            return Plan(d, self._sobol(d) | self._key(0), 0, 1,
                        f"learning-rate search of depth {d}: its point of the search box")
        # Later rounds: the best setting of a neighbouring depth not yet tried here.
        tried = {self._setting(p) for p in search.get(d, [])}
        best: tuple[float, dict[str, Any]] | None = None
        in_play = sorted(set(self.depths) | set(search))
        i = in_play.index(d)
        neighbours = set(in_play[max(i - 1, 0):i + 2]) - {d}
        for t in trials:
            p = trial_params(t)
            if (t.state == TrialState.COMPLETE and self._repeat_of(p) == 0
                    and int(p.get(self.depth_param, -1)) in neighbours
                    and self._setting(p) not in tried
                    and (best is None or t.values[idx] > best[0])):
                best = (t.values[idx], {k: v for k, v in p.items() if k in self.setting_params})
        if best is not None:
            return Plan(d, best[1] | self._key(0), 0, rnd,
                        f"learning-rate search of depth {d}: a neighbouring depth's best")
        return Plan(d, self._step(d, rnd, search, trials, idx) | self._key(0), 0, rnd,
                    f"learning-rate search of depth {d}: a step around its best")

    def _best_gain(self, d: int, trials: Sequence[FrozenTrial],
                   idx: int) -> tuple[float, int, dict[str, Any]] | None:
        """The search-key setting of another depth that beat that depth's config-value trial by
        the most, and by more than the tolerance: (gain, depth, its values for ``d``)."""
        start, best = {}, None
        for t in trials:
            p = trial_params(t)
            if t.state == TrialState.COMPLETE and self._repeat_of(p) == 0 and self.depth_param in p:
                values = {k: v for k, v in p.items() if k in self.setting_params}
                if all(v == self.start.get(k) for k, v in values.items()):
                    start[int(p[self.depth_param])] = t.values[idx]
        # The parameters a trial of depth d samples: those of its first search trial (a
        # condition may leave some out, e.g. the backbone's rate for a head-only trial).
        own = [trial_params(t) for t in trials if trial_params(t).get(self.depth_param) == d]
        need = ({k for k in own[0] if k in self.setting_params} if own
                else set(self.setting_params))
        for t in trials:
            p = trial_params(t)
            if not (t.state == TrialState.COMPLETE and self._repeat_of(p) == 0):
                continue
            x = int(p.get(self.depth_param, -1))
            values = {k: v for k, v in p.items() if k in self.setting_params}
            if x == d or x not in start or not need <= set(values):
                continue
            gain = t.values[idx] - start[x]
            if gain > self.tolerance / 100 and (best is None or gain > best[0]):
                best = (gain, x, {k: values[k] for k in need})
        return best

    def _sobol(self, d: int) -> dict[str, Any]:
        from scipy.stats import qmc

        n = len(self.setting_params)
        if n == 0:
            return {}
        m = max(1, math.ceil(math.log2(len(self.all_depths))))
        points = qmc.Sobol(n, scramble=True, rng=np.random.default_rng(self.seed)).random_base2(m)
        row = points[self.all_depths.index(d) % len(points)]
        return {k: _from_unit(float(u), self.space[k]) for k, u in zip(self.setting_params, row,
                                                                        strict=True)}

    def _step(self, d: int, rnd: int, search: Mapping[int, list[dict[str, Any]]],
              trials: Sequence[FrozenTrial], idx: int) -> dict[str, Any]:
        """A step around depth ``d``'s best search trial, shrinking with the round."""
        best = None
        for t in trials:
            p = trial_params(t)
            if (t.state == TrialState.COMPLETE and self._repeat_of(p) == 0
                    and int(p.get(self.depth_param, -1)) == d
                    and (best is None or t.values[idx] > best[0])):
                best = (t.values[idx], p)
        centre = best[1] if best else self._start_values()
        rng = np.random.default_rng([self.seed, d, rnd])
        out = {}
        for k in self.setting_params:
            dist = self.space[k]
            u = _to_unit(centre.get(k, self.start.get(k)), dist)
            out[k] = _from_unit(float(np.clip(u + rng.normal(0, 0.25 / rnd), 0, 1)), dist)
        return out

    def _gap(self, decision: Decision, in_play: list[int]) -> int | None:
        if set(in_play) >= set(self.all_depths):
            return None
        measured = [d for d in in_play if decision.arms.get(d) and decision.arms[d].n]
        live = [d for d in measured if decision.arms[d].status != "worse"]
        if not live:
            return None
        c = min(live)
        below = [d for d in measured if d < c]
        if not below:
            return None
        between = [d for d in self.all_depths if max(below) < d < c]
        return between[len(between) // 2] if between else None

    def _repeat(self, d: int, decision: Decision, taken: Mapping[int, list[dict[str, Any]]],
                why: str) -> Plan:
        """The next repeat of depth ``d`` at its setting, paired with the reference: the first
        repeat index that ``d`` and the reference do not both have, the reference first."""
        ref = decision.reference

        def indices(depth: int) -> set[int]:
            setting = decision.arms[depth].setting
            return {self._repeat_of(p) for p in taken.get(depth, []) if self._setting(p) == setting}

        mine = indices(d)
        theirs = indices(ref) if ref is not None and ref != d else mine
        r = 1
        while r in mine and r in theirs:
            r += 1
        depth = d
        if ref is not None and ref != d and r not in theirs:
            depth = ref
            why += f"; the reference (depth {ref}) runs repeat {r} first"
        values = dict(decision.arms[depth].setting or ()) | self._key(r)
        return Plan(depth, values, r, -1, why)


class DepthPruner(BasePruner):
    """Stops a trial whose validation accuracy after an epoch is more than ``margin`` points
    below the best of the same depth's earlier complete trials on the same repeat key (the
    same data and seed: its learning-rate search) at that epoch, after ``n_warmup_steps``
    epochs. Repeats are never pruned: no earlier trial shares their depth and key."""

    def __init__(self, margin: float = 3.0, n_warmup_steps: int = 3, depth_param: str = DEPTH,
                 repeat_keys: Sequence[str] = REPEAT_KEYS) -> None:
        self.margin = float(margin)
        self.n_warmup_steps = int(n_warmup_steps)
        self.depth_param = depth_param
        self.repeat_keys = tuple(repeat_keys)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step <= self.n_warmup_steps:
            return False
        mine = trial_params(trial)
        same = [mine.get(k) for k in (self.depth_param, *self.repeat_keys)]
        peers = [t.intermediate_values.get(step)
                 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.number < trial.number
                 and [t.params.get(k) for k in (self.depth_param, *self.repeat_keys)] == same]
        peers = [v for v in peers if v is not None]
        return bool(peers) and trial.intermediate_values[step] < max(peers) - self.margin / 100


def _signature(trials: Sequence[FrozenTrial]) -> tuple:
    return tuple((t.number, t.state) for t in trials)


def _val_index(study: optuna.Study) -> int:
    names = study.metric_names or []
    return names.index("val_acc") if "val_acc" in names else 0


def _to_unit(value: Any, dist: BaseDistribution) -> float:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices.index(value) / max(len(dist.choices) - 1, 1) if value in dist.choices else 0.5
    lo, hi = float(dist.low), float(dist.high)
    if value is None or hi == lo:
        return 0.5
    v = min(max(float(value), lo), hi)
    if dist.log:
        return (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (v - lo) / (hi - lo)


def _from_unit(u: float, dist: BaseDistribution) -> Any:
    u = min(max(u, 0.0), 1.0)
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
    lo, hi = float(dist.low), float(dist.high)
    x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if dist.log else lo + u * (hi - lo)
    if isinstance(dist, IntDistribution):
        step = dist.step or 1
        return int(min(max(dist.low + round((x - dist.low) / step) * step, dist.low), dist.high))
    assert isinstance(dist, FloatDistribution)
    if dist.step:
        x = lo + round((x - lo) / dist.step) * dist.step
    return float(min(max(x, lo), hi))


def _clip(value: Any, dist: BaseDistribution) -> Any:
    """A planned value inside ``dist`` (the config's learning rate may lie outside the box)."""
    if isinstance(dist, CategoricalDistribution):
        return value if value in dist.choices else dist.choices[0]
    if isinstance(dist, IntDistribution):
        return int(min(max(int(value), dist.low), dist.high))
    return float(min(max(float(value), dist.low), dist.high))
