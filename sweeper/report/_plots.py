"""The study report's plots: the Pareto front, accuracy and time by depth, parameter importances."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd

from sweeper.tracking import State

log = logging.getLogger("sweeper.report")


def pareto_mask(trials: pd.DataFrame) -> pd.Series:
    """Complete trials no other trial beats on both accuracy (higher) and time (lower)."""
    done = trials[trials.state == State.COMPLETE]
    mask = pd.Series(False, index=trials.index)
    for i, t in done.iterrows():
        dominated = ((done.val_acc >= t.val_acc) & (done.train_time_s <= t.train_time_s)
                     & ((done.val_acc > t.val_acc) | (done.train_time_s < t.train_time_s))).any()
        mask[i] = not dominated
    return mask


def plots(trials: pd.DataFrame, folder: Path, study=None) -> list[str]:
    """Draw the study's plots into ``folder``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = trials[trials.state == State.COMPLETE]
    written = []
    if len(done):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        sc = ax.scatter(done.train_time_s, done.val_acc, c=done.unfrozen, cmap="viridis", s=40,
                        vmin=0, vmax=max(int(trials.num_units.max()), 1))
        front = done[pareto_mask(trials)[done.index]].sort_values("train_time_s")
        ax.plot(front.train_time_s, front.val_acc, "k--", lw=1, label="Pareto front")
        ax.scatter(front.train_time_s, front.val_acc, facecolors="none", edgecolors="k", s=110)
        fig.colorbar(sc, ax=ax, label="unfrozen units")
        ax.set(xlabel="training time (s)", ylabel="validation accuracy",
               title="Training time vs accuracy, every trial")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / "pareto.png", dpi=120)
        plt.close(fig)
        written.append("pareto.png")

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        depths = sorted(done.unfrozen.unique())
        for ax, col, label in ((a1, "val_acc", "validation accuracy"),
                               (a2, "train_time_s", "training time (s)")):
            ax.boxplot([done[done.unfrozen == d][col] for d in depths], positions=depths,
                       widths=0.6)
            ax.scatter(done.unfrozen, done[col], s=12, alpha=0.6)
            ax.set(xlabel="unfrozen units", ylabel=label, title=f"{label} by depth")
        fig.tight_layout()
        fig.savefig(folder / "depth.png", dpi=120)
        plt.close(fig)
        written.append("depth.png")
    if study is not None:
        importances = _importances(study)
        if importances:
            fig, ax = plt.subplots(figsize=(6, 3))
            names = list(importances)[::-1]
            ax.barh(names, [importances[n] for n in names])
            ax.set(xlabel="importance for validation accuracy (Optuna's default evaluator)",
                   title="Hyperparameter importances")
            fig.tight_layout()
            fig.savefig(folder / "importance.png", dpi=120)
            plt.close(fig)
            written.append("importance.png")
    return written


def _importances(study) -> dict[str, float]:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}
    try:
        # Optuna's default evaluator (PED-ANOVA) ranks what drives the target *low*: negate a
        # maximised first objective (validation accuracy).
        sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        with warnings.catch_warnings():  # its reminder to do exactly that
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator")
            return optuna.importance.get_param_importances(
                study, target=lambda t: sign * t.values[0])
    except (ValueError, RuntimeError) as e:
        log.info("No parameter importances: %s", e)
        return {}
