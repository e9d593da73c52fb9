"""The study report's plots: the Pareto front (a marker per freeze strategy), accuracy and time
by depth, parameter importances."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pandas as pd

from sweeper.decision import Decision
from sweeper.tracking import State

log = logging.getLogger("sweeper.report")

# One marker per freeze strategy (sweeper.schedule.STRATEGIES) on the Pareto plot.
MARKERS = {"depth": "o", "progressive": "^", "gradual": "s"}


def pareto_mask(trials: pd.DataFrame) -> pd.Series:
    """Complete trials no other trial beats on both accuracy (higher) and time (lower)."""
    done = trials[trials.state == State.COMPLETE]
    mask = pd.Series(False, index=trials.index)
    for i, t in done.iterrows():
        dominated = ((done.val_acc >= t.val_acc) & (done.train_time_s <= t.train_time_s)
                     & ((done.val_acc > t.val_acc) | (done.train_time_s < t.train_time_s))).any()
        mask[i] = not dominated
    return mask


def plots(trials: pd.DataFrame, table: pd.DataFrame, decision: Decision, folder: Path,
          study=None) -> list[str]:
    """Draw the study's plots into ``folder``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = trials[trials.state == State.COMPLETE]
    written = []
    if len(done) and "status" in table:
        _depth_plot(plt, done, table, decision, folder / "depth.png")
        written.append("depth.png")
    if len(done):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        several = done.strategy.nunique() > 1
        for strategy, group in done.groupby("strategy", sort=False):
            sc = ax.scatter(group.train_time_s, group.val_acc, c=group.unfrozen, cmap="viridis",
                            s=40, vmin=0, vmax=max(int(trials.num_units.max()), 1),
                            marker=MARKERS.get(strategy, "D"))
        front = done[pareto_mask(trials)[done.index]].sort_values("train_time_s")
        ax.plot(front.train_time_s, front.val_acc, "k--", lw=1, label="Pareto front")
        ax.scatter(front.train_time_s, front.val_acc, facecolors="none", edgecolors="k", s=110)
        ax.margins(0.08, 0.12)  # room for the outlined front's markers at the edges
        fig.colorbar(sc, ax=ax, label="unfrozen units")
        ax.set(xlabel="training time (s)", ylabel="validation accuracy",
               title="Training time vs accuracy, every trial"
               + (" (marker: strategy)" if several else ""))
        handles, _ = ax.get_legend_handles_labels()
        if several:  # the markers in grey: their colour is the depth's
            from matplotlib.lines import Line2D

            handles += [Line2D([], [], marker=MARKERS.get(s, "D"), color="grey", linestyle="none",
                               label=f"freeze={s}") for s in done.strategy.unique()]
        ax.legend(handles=handles, loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / "pareto.png", dpi=120)
        plt.close(fig)
        written.append("pareto.png")
    if study is not None:
        found, rough = importances(study)
        if found:
            fig, ax = plt.subplots(figsize=(6, 3))
            names = list(found)[::-1]
            ax.barh(names, [found[n] for n in names])
            ax.set(xlabel="importance for validation accuracy (Optuna's default evaluator)")
            ax.set_title("Hyperparameter importances" + (
                f"\n(rough for {', '.join(rough)}: too few trials in part of its range)"
                if rough else ""), fontsize=10 if rough else None)
            fig.tight_layout()
            fig.savefig(folder / "importance.png", dpi=120)
            plt.close(fig)
            written.append("importance.png")
    return written


def _depth_plot(plt, done: pd.DataFrame, table: pd.DataFrame, decision: Decision,
                path: Path) -> None:
    """Left: mean validation accuracy per depth (and freeze strategy: its marker, set a little
    to the side) with its interval (repeats: t; one trial: Wilson, dashed), every complete trial
    behind it, the best mean less the tolerance, the recommendation ringed. Right: training time
    per depth (median, every trial)."""
    rows = table[table.status.apply(lambda s: isinstance(s, str))]
    several = rows.strategy.nunique() > 1
    shift = {s: 0.18 * i if several else 0.0 for i, s in enumerate(MARKERS)}
    x = rows.unfrozen + rows.strategy.map(shift).fillna(0.0)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.scatter(done.unfrozen + done.strategy.map(shift).fillna(0.0), done.val_acc, s=10,
               color="0.7", zorder=1, label="every complete trial")
    conf = decision.confidence
    for strategy in rows.strategy.unique():
        for repeated, style in ((True, "-"), (False, "--")):
            mask = (rows.strategy == strategy) & ((rows.repeats > 1) == repeated)
            part = rows[mask]
            if not len(part):
                continue
            what = (f"mean over repeats, {conf:.0%} CI" if repeated else
                    f"one trial, {conf:.0%} Wilson CI")
            bars = a1.errorbar(x[mask], part.val_acc,
                               yerr=[part.val_acc - part.val_acc_low,
                                     part.val_acc_high - part.val_acc],
                               fmt=MARKERS.get(strategy, "D"), color="C0", capsize=4, zorder=3,
                               label=f"freeze={strategy}: {what}" if several else what)
            bars[-1][0].set_linestyle(style)
    arm = list(zip(rows.strategy, rows.unfrozen.astype(int), strict=True))
    if decision.reference is not None:
        best = rows[[a == decision.reference for a in arm]].val_acc.iloc[0]
        a1.axhline(best - decision.tolerance / 100, color="C3", lw=1, ls=":",
                   label=f"best mean − {decision.tolerance:g} point tolerance")
    if decision.recommended is not None:
        pick = [a == decision.recommended for a in arm]
        a1.scatter(x[pick], rows[pick].val_acc, s=220, facecolors="none", edgecolors="C2",
                   lw=2, zorder=4, label="recommended" + ("" if decision.settled else
                                                          " (not settled)"))
    a1.set(xlabel="unfrozen units" + (" (progressive: at the start; gradual: at most)"
                                      if several else ""),
           ylabel="validation accuracy", title="Validation accuracy by depth")
    a1.legend(loc="lower right", fontsize=8)
    a2.scatter(done.unfrozen, done.train_time_s, s=12, color="0.6", label="every complete trial")
    for strategy, mine in done.groupby("strategy", sort=False):
        median = mine.groupby("unfrozen").train_time_s.median()
        a2.plot(median.index, median.values, MARKERS.get(strategy, "D") + "-",
                label=f"median, freeze={strategy}" if several else "median",
                color="C1" if strategy == "depth" else None)
    a2.set(xlabel="unfrozen units", ylabel="training time (s)", title="Training time by depth")
    a2.legend(loc="upper left", fontsize=8)
    for ax in (a1, a2):
        ax.set_xticks(sorted(done.unfrozen.unique()))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def importances(study) -> tuple[dict[str, float], list[str]]:
    """Optuna's parameter importances for the first objective, and the parameters its
    evaluator found too few trials for in some of their range (said on the plot, instead of
    a Python warning in the middle of the report's output)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}, []
    try:
        # Optuna's default evaluator (PED-ANOVA) ranks what drives the target *low*: negate a
        # maximised first objective (validation accuracy).
        sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator")
            importances = optuna.importance.get_param_importances(
                study, target=lambda t: sign * t.values[0])
    except (ValueError, RuntimeError) as e:
        log.info("No parameter importances: %s", e)
        return {}, []
    rough = []
    for w in said:
        m = re.search(r"regimes for parameter `([^`]+)`( have less than)?", str(w.message))
        if m is None:  # any other warning as it was
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif m.group(2):
            rough.append(m.group(1))
    return importances, list(dict.fromkeys(rough))
