"""A study's report: per depth (and freeze strategy, ``freeze=depth|progressive|gradual``), the
mean validation accuracy over its repeats with a 95% interval, and the recommendation by the
rule of :mod:`sweeper.decision`, from what MLflow recorded.

Each (strategy, unfrozen) pair is one arm of the rule; a study of fixed depths has one per
depth. An arm's cost is the mean number of units that train per step
(:func:`sweeper.schedule.mean_units`; a fixed depth: its unfrozen units), so the rule
recommends the cheapest configuration within tolerance of the best, whatever its strategy.

The report is written as ``report.md``, ``depths.csv`` and PNG plots under
``<paths.studies>/<study>/report/`` and logged as artifacts (``report/``) of the study's
parent MLflow run, which also gets the answer as tags (``recommended.strategy``,
``recommended.unfrozen``, ``recommended.lr_head``, ``recommended.lr_backbone``,
``recommended.settled``, ``recommended.freeze.*`` for a strategy's parameters) and metrics
(``recommended.val_acc_mean``, ``recommended.val_acc_ci_low``, ``recommended.val_acc_ci_high``,
``recommended.train_time_s``, ``recommended.test_acc``, ``recommended.repeats``); the terminal
shows the table and the recommendation. The rule, its tolerance and confidence are the
study's (``hydra.sweeper.tolerance``, ``.confidence``, logged on its parent run).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from sweeper import schedule
from sweeper.decision import (
    UNDECIDED,
    WORSE,
    Decision,
    Measurement,
    decide,
)
from sweeper.errors import UserError
from sweeper.report._plots import plots
from sweeper.storage import open_storage
from sweeper.tracking import Kind, Param, State, Tag, Tracker, command_overrides, train_command

log = logging.getLogger("sweeper.report")

# The columns that key the per-depth table (and a trial's arm).
ARM = ["strategy", "unfrozen"]
DEPTH = "depth"  # the fixed-depth strategy: runs from before strategies are this
# Parent-run params of a study: the rule it was run with (hydra.sweeper.tolerance, .confidence).
RULE_TOLERANCE = "rule.tolerance"
RULE_CONFIDENCE = "rule.confidence"
# The searched values a depth's trials differ in, when the parent run does not name them.
SETTING = [str(Param.LR_HEAD), str(Param.LR_BACKBONE)]


@dataclass
class Report:
    study: str
    parent_run_id: str
    table: pd.DataFrame  # one row per strategy and depth
    trials: pd.DataFrame  # one row per trial
    recommended: dict[str, Any] | None
    explanation: str
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None
    decision: Decision | None = None


# --- gathering --------------------------------------------------------------------------------

def find_parent(tracker: Tracker, study: str | None = None, parent_run: str | None = None):
    """The parent MLflow run of a study: by run id, by study name, or the latest study."""
    client = tracker.client
    if parent_run:
        from mlflow.exceptions import MlflowException

        try:
            return client.get_run(parent_run)
        except MlflowException:
            raise UserError(f"No MLflow run {parent_run} in {tracker.uri}.") from None
    query = f"tags.`{Tag.KIND}` = '{Kind.STUDY}'"
    if study:
        query += f" and tags.`{Tag.STUDY}` = '{study}'"
    runs = client.search_runs([tracker.experiment_id], query, order_by=["start_time DESC"],
                              max_results=1)
    if not runs:
        what = f"named {study!r}" if study else "at all"
        others = sorted({r.data.tags.get(Tag.STUDY) for r in client.search_runs(
            [tracker.experiment_id], f"tags.`{Tag.KIND}` = '{Kind.STUDY}'", max_results=200)}
            - {None}) if study else []
        hint = (f"Its studies: {', '.join(others)} (study=NAME)." if others
                else "Run one first:  python -m sweeper.run -m")
        raise UserError(f"No study {what} in MLflow experiment {tracker.experiment_id} at "
                        f"{tracker.uri}. {hint}")
    return runs[0]


def setting_keys(parent_params: dict[str, str]) -> list[str]:
    """The searched values a depth's trials differ in (its learning rates, ...): the study's
    ``search.*`` params other than the depth, fixed values and repeat keys."""
    keys = [k.removeprefix("search.") for k, v in parent_params.items()
            if k.startswith("search.") and not v.startswith(("fixed", "repeat key"))]
    arm = (Param.UNFROZEN, Param.STRATEGY, "freeze")  # the arm's keys: not a setting
    keys = [k for k in keys if k.lstrip("+~") not in arm]
    return sorted(keys) or SETTING


def _value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def trial_frame(tracker: Tracker, parent_run_id: str,
                setting: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per child run of the study: its strategy, depth, setting (learning rates, a
    strategy's searched parameters; default: the study's, :func:`setting_keys` of its parent
    run), repeat key (seed, split), state, metrics, and ``units``: the mean number of units
    that train per step (:func:`sweeper.schedule.mean_units`)."""
    if setting is None:
        setting = setting_keys(tracker.client.get_run(parent_run_id).data.params)
    runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`{Tag.PARENT}` = '{parent_run_id}'", max_results=50000)
    rows = []
    for r in sorted(runs, key=lambda r: r.info.start_time):
        p, m, t = r.data.params, r.data.metrics, r.data.tags
        if not p:  # a trial that failed before its config was logged: no depth to count it at
            continue
        strategy = p.get(Param.STRATEGY, DEPTH)
        freeze = {k: p.get(f"freeze.{k}") for k in schedule.PARAMETERS.get(strategy, ())}
        unfrozen, num_units = int(p[Param.UNFROZEN]), int(p[Param.NUM_UNITS])
        rows.append({
            "trial": int(t[Tag.TRIAL]) if Tag.TRIAL in t else None,
            "run_id": r.info.run_id, "state": t.get(Tag.STATE) or State.of_status(r.info.status),
            "strategy": strategy, "unfrozen": unfrozen, "num_units": num_units,
            "schedule": schedule.summary(strategy, unfrozen, freeze),
            "units": schedule.mean_units(strategy, unfrozen, num_units,
                                         int(p.get("trainer.epochs", 1)), freeze),
            "lr_head": float(p[Param.LR_HEAD]), "lr_backbone": float(p[Param.LR_BACKBONE]),
            "seed": int(p.get(Param.SEED, 0)), "split_seed": int(p.get(Param.SPLIT_SEED, 0)),
            "setting": tuple((k, _value(p.get(k))) for k in setting),
            "val_acc": m.get("val_acc", math.nan), "test_acc": m.get("test_acc", math.nan),
            "train_time_s": m.get("train_time_s", math.nan),
            "trainable_params": m.get("trainable_params", math.nan),
            "val_images": m.get("val_images", math.nan),
            "command": _train_command(t.get(Tag.RERUN_COMMAND, ""), p),
        })
    columns = ["trial", "run_id", "state", "strategy", "unfrozen", "num_units", "schedule",
               "units", "lr_head", "lr_backbone", "seed", "split_seed", "setting", "val_acc",
               "test_acc", "train_time_s", "trainable_params", "val_images", "command"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["order"] = range(len(frame))  # start order: the trial number where there is none
    frame.loc[frame.trial.notna(), "order"] = frame.trial[frame.trial.notna()]
    rank = frame.strategy.map(_RANK).fillna(len(_RANK))  # depth first, then the others
    return frame.assign(_rank=rank).sort_values(["_rank", "unfrozen", "order"],
                                                na_position="last").drop(columns="_rank")


_RANK = {s: i for i, s in enumerate(schedule.STRATEGIES)}


def _train_command(logged: str, params: dict[str, str]) -> str:
    """The command that trains this trial's strategy (its parameters included), depth and
    learning rates with its other overrides."""
    strategy = params.get(Param.STRATEGY, DEPTH)
    chosen = {"freeze": strategy} if strategy != DEPTH else {}
    chosen.update({k: params[k] for k in (Param.UNFROZEN, Param.LR_HEAD, Param.LR_BACKBONE)})
    chosen.update({f"freeze.{k}": params[f"freeze.{k}"]
                   for k in schedule.PARAMETERS.get(strategy, ()) if f"freeze.{k}" in params})
    if params.get("optim.layer_decay", "1.0") not in ("1", "1.0"):
        chosen["optim.layer_decay"] = params["optim.layer_decay"]
    base = command_overrides(logged) if logged else []
    keep = [o for o in base if o.split("=", 1)[0].lstrip("+~") not in chosen]
    return train_command([*keep, *(f"{k}={v}" for k, v in chosen.items())])


def measurements(trials: pd.DataFrame) -> list[Measurement]:
    """The trials as the rule sees them: arm, setting, repeat key, val_acc when complete."""
    out = []
    for _, t in trials.iterrows():
        if t.state not in (State.COMPLETE, State.PRUNED, State.FAILED):
            continue
        done = t.state == State.COMPLETE and not math.isnan(t.val_acc)
        images = None if math.isnan(t.val_images) else int(t.val_images)
        out.append(Measurement((t.strategy, int(t.unfrozen)), t.setting, (int(t.seed), int(t.split_seed)),
                               float(t.val_acc) if done else None, images, int(t.order)))
    return out


def _arm_trials(trials: pd.DataFrame, decision: Decision, arm: tuple[str, int]) -> pd.DataFrame:
    """The complete trials that are ``arm``'s measurements (its setting, one per key)."""
    s = decision.arms[arm]
    strategy, depth = arm
    mine = trials[(trials.strategy == strategy) & (trials.unfrozen == depth)
                  & (trials.state == State.COMPLETE)]
    if mine.empty:  # (a boolean mask from apply on no rows would drop the columns)
        return mine
    mine = mine[mine.setting.apply(lambda x: x == s.setting)]
    return mine.drop_duplicates(subset=["seed", "split_seed"])


def candidate_runs(trials: pd.DataFrame) -> list[str]:
    """The runs that may still need a test accuracy while a study goes on: every arm's
    measurements under the rule (its complete trials at its chosen learning rates, one per
    seed and split). A study keeps their trained parts; a trial this leaves out is never
    needed later (:func:`tested_runs` picks among these): an arm's learning rates change only
    to those of a better trial on the first seed and split, and its repeats run at the rates
    it has. It does not depend on the rule's tolerance or confidence.
    """
    decision = decide_study(trials)
    return [run for arm in decision.arms for run in _arm_trials(trials, decision, arm).run_id]


def tested_runs(trials: pd.DataFrame, tolerance: float = 1.0, confidence: float = 0.95,
                pareto: Collection[int] = ()) -> list[str]:
    """The runs whose test accuracy a study measures, once, when it ends: the measurements
    of the recommended configuration and of the reference (the best mean, which the
    recommendation is compared with) under the rule at ``tolerance`` and ``confidence``,
    and the trials numbered in ``pareto`` (the study's Pareto set, Optuna's
    ``best_trials``). ``recommended.test_acc`` and the table's test column are their means.

    The one place that decides which trials get a test accuracy. The test set is for the
    final answer, not for choosing between depths, and each evaluation is a pass over the
    whole test split: the other depths' rows show none. Every run it names is among
    :func:`candidate_runs` or in the Pareto set, so its trained part was kept.
    """
    decision = decide_study(trials, tolerance, confidence)
    arms = dict.fromkeys(a for a in (decision.recommended, decision.reference) if a is not None)
    runs = [run for arm in arms for run in _arm_trials(trials, decision, arm).run_id]
    front = trials[trials.trial.isin(list(pareto)) & (trials.state == State.COMPLETE)]
    return list(dict.fromkeys([*runs, *front.run_id]))


def decide_study(trials: pd.DataFrame, tolerance: float = 1.0,
                 confidence: float = 0.95) -> Decision:
    """The rule applied to a study's trials, arms ordered by cost: the mean number of units
    that train per step at the arm's setting (a fixed depth: its unfrozen units; ties: the
    strategies' order, then depth)."""
    ms = measurements(trials)
    first = decide(ms, tolerance, confidence)  # each arm's setting: not a matter of cost
    cost: dict[Any, tuple[float, int, int]] = {}
    for arm, s in first.arms.items():
        strategy, depth = arm
        mine = _arm_trials(trials, first, arm) if s.n else trials[
            (trials.strategy == strategy) & (trials.unfrozen == depth)]
        cost[arm] = (round(float(mine.units.median()), 9), _RANK.get(strategy, len(_RANK)),
                     depth)
    return decide(ms, tolerance, confidence, cost=cost.__getitem__, cheapest=(DEPTH, 0))


def depth_table(trials: pd.DataFrame, decision: Decision) -> pd.DataFrame:
    """One row per strategy and depth (the fixed depths first): its setting, repeats, mean val
    acc with its interval, difference to the reference with its bounds, status, test acc,
    median time, counts, and the units that train per step on average."""
    complete = trials[trials.state == State.COMPLETE]
    full = complete[(complete.strategy == DEPTH) & (complete.unfrozen == complete.num_units)]
    full_time = full.train_time_s.median() if len(full) else math.nan
    rows = []
    groups = sorted(trials.groupby(ARM), key=lambda g: (_RANK.get(g[0][0], len(_RANK)), g[0][1]))
    for (strategy, depth), group in groups:
        done = group[group.state == State.COMPLETE]
        row: dict[str, Any] = {"strategy": strategy, "unfrozen": depth, "trials": len(group),
                               "pruned": int((group.state == State.PRUNED).sum()),
                               "failed": int((group.state == State.FAILED).sum())}
        arm = (strategy, int(depth))
        s = decision.arms.get(arm)
        if s is not None and s.n:
            mine = _arm_trials(trials, decision, arm)
            first = mine.iloc[0]
            time = done.train_time_s.median()
            row.update(
                lr_head=first.lr_head, lr_backbone=first.lr_backbone if depth > 0 else math.nan,
                repeats=s.n, val_acc=s.interval.mean, val_acc_low=s.interval.low,
                val_acc_high=s.interval.high, interval=s.interval.kind,
                diff=s.diff.mean if s.diff else 0.0,
                diff_low=s.diff.low if s.diff else math.nan,
                diff_high=s.diff.high if s.diff else math.nan,
                status=s.status, more=s.more if s.more is not None else math.nan,
                schedule=first.schedule, units=first.units,
                # over all its measurements, or none (a Pareto trial among them is not its mean)
                test_acc=mine.test_acc.mean() if mine.test_acc.notna().all() else math.nan,
                train_time_s=time,
                speedup_vs_full=full_time / time, trainable_params=first.trainable_params,
                run_id=mine.loc[mine.val_acc.idxmax()].run_id, command=first.command)
        rows.append(row)
    return pd.DataFrame(rows)


# --- the recommendation ---------------------------------------------------------------------

def _pts(x: float) -> str:
    return f"{x * 100:+.1f}"


def _lrs(row: dict[str, Any]) -> str:
    return f"lr_head={row['lr_head']:.3g}" + (
        f", lr_backbone={row['lr_backbone']:.3g}" if row["unfrozen"] > 0 else "")


def _interval(row: dict[str, Any], confidence: float) -> str:
    kind = ("over " + ("1 trial (val-set sampling only)" if row["repeats"] == 1 else
                       f"{int(row['repeats'])} seeds and data splits"))
    return (f"{row['val_acc']:.3f} ({confidence:.0%} CI {row['val_acc_low']:.3f}–"
            f"{row['val_acc_high']:.3f} {kind})")


def _label(arm: tuple[str, int]) -> str:
    """An arm as the user sets it: ``depth 5`` (a fixed depth) or ``freeze=progressive
    unfrozen=9``."""
    strategy, depth = arm
    return f"depth {depth}" if strategy == DEPTH else f"freeze={strategy} unfrozen={depth}"


def _arm(row: dict[str, Any]) -> tuple[str, int]:
    return row["strategy"], int(row["unfrozen"])


def recommend(table: pd.DataFrame, decision: Decision, sampler: str | None = None,
              study: str | None = None) -> tuple[dict | None, str]:
    """The recommended arm's row (its strategy and depth) with the answer's numbers, and the
    plain-words why; ``sampler`` (the parent run's ``sampler`` param) and ``study`` (its name)
    fit the advice for an unsettled answer to the study (:func:`undecided_text`)."""
    if decision.recommended is None or table.empty or "status" not in table:
        return None, "No trial completed, so there is nothing to recommend yet."
    rows = {_arm(r): r.to_dict() for _, r in table.iterrows() if isinstance(r.status, str)}
    pick, ref = rows[decision.recommended], rows[decision.reference]
    tol, conf = decision.tolerance, decision.confidence
    strategy, depth = decision.recommended
    what = "depths" if set(table.strategy) == {DEPTH} else "configurations"
    if strategy == DEPTH:
        text = f"Unfreeze the last {depth} units ({_lrs(pick)})"
    else:
        text = f"Use freeze={strategy} ({pick['schedule']}; {_lrs(pick)})"
    text += (f": validation accuracy {_interval(pick, conf)}, {pick['train_time_s']:.1f} s of "
             "training")
    speedup = pick.get("speedup_vs_full", math.nan)
    if not math.isnan(speedup) and round(speedup, 1) != 1.0:  # not full fine-tuning itself
        text += f" ({speedup:.1f}x faster than fine-tuning every unit)"
    text += ". "
    if decision.recommended == decision.reference:
        text += f"It has the best mean validation accuracy of all {what}. "
    else:
        d = decision.arms[decision.recommended].diff
        how = "paired by seed and split" if d.kind == "paired" else {
            "welch": "unpaired (Welch)", "binomial": "from single trials"}.get(d.kind, d.kind)
        text += (f"The best mean is {_label(decision.reference)}'s ({ref['val_acc']:.3f}); "
                 f"with {conf:.0%} confidence {_label(decision.recommended)} is at most "
                 f"{-d.low * 100:.1f} points below it ({how}: {_pts(d.mean)} points, bounds "
                 f"{_pts(d.low)} and {_pts(d.high)}), within the {tol:g}-point tolerance. ")
    order = list(decision.arms)  # cheapest first
    cheaper = [rows[a] for a in order[:order.index(decision.recommended)] if a in rows]
    worse = [r for r in cheaper if r["status"] == WORSE]
    if worse:
        text += (f"With {conf:.0%} confidence every one of these cheaper {what} is more than "
                 f"{tol:g} point{'s' if tol != 1 else ''} below the best: " + ", ".join(
                     (str(int(r["unfrozen"])) if what == "depths" else _label(_arm(r)))
                     + f" ({_pts(r['diff'])})" for r in worse) + ". ")
    if decision.uncompared:
        measured = [a for a, s in decision.arms.items() if s.n]
        if what == "depths":
            names = ("depth" + ("s " if len(measured) > 1 else " ")
                     + ", ".join(str(a[1]) for a in measured))
        else:
            names = ", ".join(_label(a) for a in measured)
        text += (f"The study measured only {names}, so it compares nothing cheaper: the answer "
                 f"is not settled (the default study, hydra/sweeper/sampler=depth, measures "
                 f"every depth).")
    elif decision.settled:
        text += f"The answer is settled: no cheaper {what[:-1]} is undecided."
    else:
        text += undecided_text(decision, rows, sampler=sampler, study=study)
    return {**pick, "settled": decision.settled}, text


def undecided_text(decision: Decision, rows: dict[tuple[str, int], dict[str, Any]],
                   detail: int = 3, sampler: str | None = None, study: str | None = None) -> str:
    """What the data cannot tell apart yet, and how many more repeats would settle it (the
    ``detail`` cheapest undecided arms in words, the rest by name), and what would: more
    trials of the same study, or, for a grid study (its size is fixed: more ``n_trials`` run
    nothing), the default study, which repeats the depths in contention, under its own name."""
    tol, conf = decision.tolerance, decision.confidence
    points = f"{tol:g} point{'s' if tol != 1 else ''}"
    what = "depth" if all(a[0] == DEPTH for a in decision.arms) else "configuration"
    short = (lambda a: str(a[1])) if what == "depth" else _label
    ref = decision.reference
    parts = []
    for arm in decision.undecided[:detail]:
        s = decision.arms.get(arm)
        if arm not in rows or s is None or s.status != UNDECIDED:
            parts.append(f"{_label(arm)} has no complete trial")
            continue
        if s.more is None:
            more = "more repeats would settle it"
        elif s.more > 200:
            more = "more than 200 repeats: its difference sits on the tolerance"
        elif what == "depth":
            more = f"about {s.more} more repeats of depths {arm[1]} and {ref[1]} would settle it"
        else:
            more = (f"about {s.more} more repeats of {_label(arm)} and {_label(ref)} would "
                    "settle it")
        parts.append(f"{_label(arm)} is {_pts(s.diff.mean)} points from the best (bounds "
                     f"{_pts(s.diff.low)} and {_pts(s.diff.high)}): {more}")
    rest = decision.undecided[detail:]
    if rest:
        parts.append("also " + ", ".join(map(short, rest)) + " (see the table)")
    return (f"The data cannot yet tell whether every cheaper {what} is within {points} of the "
            f"best ({conf:.0%} confidence): " + "; ".join(parts) + ". " + _firmer(sampler, study))


def _firmer(sampler: str | None, study: str | None) -> str:
    """What gives a firmer answer than the study's: more of its trials, unless its sampler's
    size is fixed (the grid's: every combination once)."""
    if sampler is not None and sampler.startswith("GridSampler"):
        name = f"{study}-depth" if study else "..."
        return ("The grid sampler runs every combination once, so raising "
                "hydra.sweeper.n_trials adds no trial: for a firmer answer run the default "
                "study (hydra/sweeper/sampler=depth), which repeats the depths in contention "
                f"with new seeds and data splits, as a study of its own "
                f"(hydra.sweeper.study_name={name}).")
    return "Raise hydra.sweeper.n_trials and run the same command again: the study resumes."


def _load_study(parent, storage: str | None = None) -> Any:
    """The Optuna study behind a parent run, if its storage is reachable.

    ``storage`` overrides the run's ``optuna.storage`` tag (which hides any password).
    """
    tags = parent.data.tags
    name, storage = tags.get(Tag.STUDY), storage or tags.get(Tag.STORAGE)
    if not name or not storage:
        return None
    try:
        import optuna

        return optuna.load_study(study_name=name, storage=open_storage(storage))
    except Exception as e:  # noqa: BLE001 - importances are optional
        log.info("Optuna study %s not loadable from %s (%s)", name, storage, e)
        return None


# --- the report ---------------------------------------------------------------------------------

def _fmt(v: Any, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, f)


def _markdown(r: Report, figures: list[str]) -> str:
    t, dec = r.table, r.decision
    tol, conf = (dec.tolerance, dec.confidence) if dec else (math.nan, math.nan)
    states = r.trials.state
    lines = [f"# Freeze-depth report: {r.study}", "",
             f"MLflow parent run `{r.parent_run_id}`; {len(r.trials)} trials "
             f"({int((states == State.COMPLETE).sum())} complete, "
             f"{int((states == State.PRUNED).sum())} pruned, "
             f"{int((states == State.FAILED).sum())} failed).", "",
             "## Recommendation", "", r.explanation, ""]
    if r.recommended:
        lines += ["Train it with:", "", "```bash", r.recommended["command"], "```", ""]
    mixed = _mixed(t)
    if mixed:
        lines += [
            "Each freeze strategy at each `unfrozen` is one configuration below (for `depth` the "
            "units that train; for `progressive` those that train at the start; for `gradual` "
            "the most that are unfrozen); the rule treats each like a depth. Its cost is the "
            "mean number of units that train per step (`units/step`; a fixed depth: its "
            "unfrozen units): the cheapest configuration within tolerance is recommended. "
            "`schedule`: its measured trials'.", ""]
    lines += [
        f"Rule: per depth, the learning rates of its best trial on the first seed and split; "
        f"its mean validation accuracy over the repeats at those rates (other seeds and "
        f"splits) with a {conf:.0%} t interval (one trial: a Wilson interval over the val "
        f"images). The reference is the depth with the best mean; each depth's difference to "
        f"it is paired by seed and split, with one-sided {conf:.0%} bounds. A depth is "
        f"*within* when its lower bound is above −{tol:g} points, *worse* when its upper "
        f"bound is below −{tol:g}. The recommendation is the cheapest depth within (fewer "
        f"unfrozen units train faster); it is settled when every cheaper depth is worse.", "",
        "## Per strategy and depth" if mixed else "## Per depth", "",
        ("| strategy | unfrozen | schedule | units/step " if mixed else "| unfrozen ")
        + f"| lr_head | lr_backbone | repeats | val acc (mean) | {conf:.0%} CI "
        "| vs best (points) | bounds | status | test acc | train time (s, median) "
        "| speed-up vs full | trainable params | trials | pruned | failed |",
        "|---" * (19 if mixed else 16) + "|"]
    for _, row in t.iterrows():
        g = row.get
        status = g("status") if isinstance(g("status"), str) else "–"
        if status == UNDECIDED and not math.isnan(g("more", math.nan)):
            status += f" (~{int(g('more'))} more)"
        ci = (f"{_fmt(g('val_acc_low'), '.3f')}–{_fmt(g('val_acc_high'), '.3f')}"
              if isinstance(g("status"), str) else "–")
        bounds = (f"{_pts(g('diff_low'))} / {_pts(g('diff_high'))}"
                  if isinstance(g("status"), str) and not math.isnan(g("diff_low", math.nan))
                  else "–")
        diff = _pts(g("diff")) if isinstance(g("status"), str) else "–"
        plan = g("schedule") if isinstance(g("schedule"), str) else "–"
        arm = (f"| {row.strategy} | {int(row.unfrozen)} | {plan} | {_fmt(g('units'), '.2f')} "
               if mixed else f"| {int(row.unfrozen)} ")
        lines.append(
            f"{arm}| {_fmt(g('lr_head'), '.3g')} | {_fmt(g('lr_backbone'), '.3g')} "
            f"| {_fmt(g('repeats'), '.0f')} | {_fmt(g('val_acc'), '.3f')} | {ci} | {diff} "
            f"| {bounds} | {status} | {_fmt(g('test_acc'), '.3f')} "
            f"| {_fmt(g('train_time_s'), '.2f')} | {_fmt(g('speedup_vs_full'), '.2f')} "
            f"| {_fmt(g('trainable_params'), ',.0f')} | {int(row.trials)} | {int(row.pruned)} "
            f"| {int(row.failed)} |")
    lines.append("")
    if r.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in r.notes], ""]
    titles = {"depth.png": "Accuracy and training time by depth",
              "pareto.png": "Training time against validation accuracy",
              "importance.png": "Hyperparameter importances"}
    for p in figures:
        lines += [f"## {titles[p]}", "", f"![{titles[p]}]({p})", ""]
    return "\n".join(lines)


def _mixed(table: pd.DataFrame) -> bool:
    """Whether a table has another freeze strategy than fixed depths (its strategy columns)."""
    return "strategy" in table and bool((table.strategy != DEPTH).any())


def rule_of(cfg: DictConfig, parent, tolerance: float | None,
            confidence: float | None) -> tuple[float, float]:
    """The rule's tolerance and confidence: given, else the study's (parent params), else the
    sweep's defaults (``conf/hydra/sweeper/optuna.yaml``)."""
    params = parent.data.params
    if tolerance is None and RULE_TOLERANCE in params:
        tolerance = float(params[RULE_TOLERANCE])
    if confidence is None and RULE_CONFIDENCE in params:
        confidence = float(params[RULE_CONFIDENCE])
    if tolerance is None or confidence is None:
        from sweeper.config import compose

        sweep = compose(return_hydra_config=True).hydra.sweeper
        tolerance = float(sweep.tolerance) if tolerance is None else tolerance
        confidence = float(sweep.confidence) if confidence is None else confidence
    if not 0 < confidence < 1:
        raise UserError(f"confidence={confidence}: give a level between 0 and 1, e.g. 0.95.")
    return float(tolerance), float(confidence)


def make_report(cfg: DictConfig, study: str | None = None, parent_run: str | None = None,
                tolerance: float | None = None, folder: Path | None = None, *,
                optuna_study: Any = None, storage: str | None = None,
                confidence: float | None = None) -> Report:
    """Build, write and log the report of a study (the rule: :mod:`sweeper.decision`).

    ``tolerance`` (accuracy points) and ``confidence`` default to the study's own. The answer
    also lands on the parent run as ``recommended.*`` tags and metrics. ``optuna_study`` (or
    ``storage`` to load it from) gives parameter importances; without them the storage named on
    the parent run is tried.
    """
    tracker = Tracker(cfg.tracking)
    parent = find_parent(tracker, study, parent_run)
    name = parent.data.tags.get(Tag.STUDY) or parent.info.run_name
    tolerance, confidence = rule_of(cfg, parent, tolerance, confidence)
    trials = trial_frame(tracker, parent.info.run_id, setting_keys(parent.data.params))
    decision = decide_study(trials, tolerance, confidence)
    notes = []
    if trials.empty:
        notes.append("The study has no trials yet.")
        table = pd.DataFrame(columns=[*ARM, "trials", "pruned", "failed"])
    else:
        table = depth_table(trials, decision)
        notes += study_notes(trials, decision)
        if "test_acc" in table and table.test_acc.isna().any() and table.test_acc.notna().any():
            notes.append("Test accuracy is measured once, when the study ends, for the "
                         "recommended configuration, the reference and the study's Pareto set "
                         "(`sweeper.report.tested_runs`): the test set is for the final answer, "
                         "not for choosing a depth. The other rows show none.")
    recommended, explanation = recommend(table, decision, parent.data.params.get("sampler"),
                                         name)
    if optuna_study is None:
        optuna_study = _load_study(parent, storage)
    if optuna_study is None:
        notes.append("The Optuna study was not reachable: no parameter importances.")
    folder = folder or Path(cfg.paths.studies) / name / "report"
    folder.mkdir(parents=True, exist_ok=True)
    report = Report(name, parent.info.run_id, table, trials, recommended, explanation, notes,
                    folder, decision)
    written = plots(trials, table, decision, folder, optuna_study) if not trials.empty else []
    if "importance.png" not in written and optuna_study is not None:
        notes.append("Too few complete trials or varied parameters for importances.")
    (folder / "report.md").write_text(_markdown(report, written))
    table.drop(columns=["command"], errors="ignore").to_csv(folder / "depths.csv", index=False)
    tracker.client.log_artifacts(parent.info.run_id, str(folder), "report")
    _log_answer(tracker, parent.info.run_id, recommended)
    # The run's description box in the MLflow UI: the answer where the study is opened.
    tracker.client.set_tag(parent.info.run_id, NOTE, _note(report))
    return report


def study_notes(trials: pd.DataFrame, decision: Decision) -> list[str]:
    notes = []
    num_units = int(trials.num_units.max())
    measured = {d for (strategy, d), s in decision.arms.items() if s.n and strategy == DEPTH}
    unmeasured = sorted(set(range(num_units + 1))
                        - {d for (_, d), s in decision.arms.items() if s.n})
    if unmeasured:  # a trial of any strategy measures its depth (unfrozen)
        notes.append(f"Depths without a complete trial: {unmeasured}.")
    if num_units not in measured:
        notes.append(("Full fine-tuning (freeze=depth, unfrozen=num_units)" if _mixed(trials)
                      else "Full fine-tuning (unfrozen=num_units)") + " was not measured: no "
                     "speed-up against it can be given.")
    pruned = int((trials.state == State.PRUNED).sum())
    if pruned:
        notes.append(f"{pruned} trial{'s' if pruned > 1 else ''} pruned: stopped early because "
                     "the learning curve was clearly behind the same depth's earlier trial on "
                     "the same seed and split; counted in 'trials' and 'pruned', not in the "
                     "accuracy columns.")
    if (trials.state == State.FAILED).any():
        notes.append("Failed trials (see their MLflow runs' `error` tag) are left out.")
    if all(s.n <= 1 for s in decision.arms.values()):
        notes.append("Every depth was measured once at its learning rates: its interval is "
                     "that of one accuracy over the validation images and leaves out seed and "
                     "split noise. The default study (hydra/sweeper/sampler=depth) repeats the "
                     "depths in contention.")
    done = trials[(trials.state == State.COMPLETE) & (trials.strategy == DEPTH)]
    times = done.groupby("unfrozen").train_time_s.median()
    if len(times) > 2 and not times.is_monotonic_increasing:
        notes.append("Measured training time does not grow with every unfrozen unit here "
                     "(timing noise on a shared machine?); the rule ranks depths by unfrozen "
                     "units, the table shows the measured times.")
    return notes


def _log_answer(tracker: Tracker, run_id: str, rec: dict[str, Any] | None) -> None:
    """The answer on the parent run, for scripts, the MLflow UI and CI."""
    if rec is None:
        return
    client = tracker.client
    tags = {"recommended.strategy": rec["strategy"], "recommended.unfrozen": int(rec["unfrozen"]),
            "recommended.lr_head": repr(float(rec["lr_head"])),
            "recommended.settled": str(bool(rec["settled"])).lower()}
    if rec["unfrozen"] > 0:
        tags["recommended.lr_backbone"] = repr(float(rec["lr_backbone"]))
    if rec["strategy"] != DEPTH:  # its parameters, as the command gives them
        tags["recommended.schedule"] = rec["schedule"]
        tags["recommended.command"] = rec["command"]
    metrics = {"recommended.val_acc_mean": rec["val_acc"],
               "recommended.val_acc_ci_low": rec["val_acc_low"],
               "recommended.val_acc_ci_high": rec["val_acc_high"],
               "recommended.train_time_s": rec["train_time_s"],
               "recommended.test_acc": rec["test_acc"],
               "recommended.repeats": rec["repeats"]}
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                      if v is not None and not math.isnan(float(v))],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])


NOTE = "mlflow.note.content"  # MLflow's own tag: the run's description, shown on its page


def _note(r: Report) -> str:
    text = f"**Recommendation.** {r.explanation}"
    if r.recommended:
        text += f"\n\nTrain it: `{r.recommended['command']}`"
    return text + "\n\nThe table per depth and the plots: artifact `report/report.md`."


def show(report: Report) -> None:
    """Print the table and the recommendation to the terminal."""
    from rich.console import Console
    from rich.table import Table

    # Off a terminal (logs, CI) rich assumes 80 columns and would cut the table's headers.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    conf = report.decision.confidence if report.decision else 0.95
    mixed = _mixed(report.table)
    table = Table(title=f"Study {report.study}: one row per freeze "
                  + ("strategy and depth" if mixed else "depth"))
    cols = [*(["strategy", "units/step"] if mixed else []), "unfrozen", "lr_head",
            "lr_backbone", "repeats", "val acc",
            f"{conf:.0%} CI", "vs best", "status", "test acc", "time (s)", "speed-up",
            "trials", "pruned"]
    for c in cols:
        table.add_column(c, justify="right")
    for _, row in report.table.iterrows():
        g = row.get
        measured = isinstance(g("status"), str)
        status = g("status") if measured else "–"
        if status == UNDECIDED and not math.isnan(g("more", math.nan)):
            status += f" ~{int(g('more'))}"
        arm = [str(row.strategy), _fmt(g("units"), ".2f")] if mixed else []
        cells = [*arm, str(int(row.unfrozen)), _fmt(g("lr_head"), ".3g"), _fmt(g("lr_backbone"), ".3g"),
                 _fmt(g("repeats"), ".0f"), _fmt(g("val_acc"), ".3f"),
                 f"{_fmt(g('val_acc_low'), '.3f')}–{_fmt(g('val_acc_high'), '.3f')}"
                 if measured else "–",
                 _pts(g("diff")) if measured else "–", status, _fmt(g("test_acc"), ".3f"),
                 _fmt(g("train_time_s"), ".2f"), _fmt(g("speedup_vs_full"), ".2f"),
                 str(int(row.trials)), str(int(row.pruned))]
        chosen = report.recommended and _arm(row) == _arm(report.recommended)
        table.add_row(*cells, style="bold green" if chosen else None)
    console.print(table)
    console.print(f"[bold]Recommendation:[/bold] {report.explanation}")
    if report.recommended:
        console.print(f"Train it:  {report.recommended['command']}")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"Report: {report.folder / 'report.md'}")

