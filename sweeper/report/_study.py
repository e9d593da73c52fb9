"""A study's report: its table per depth and recommendation, from what MLflow recorded.

The report is written as ``report.md`` plus PNG plots under
``<paths.studies>/<study>/report/`` and logged as artifacts (``report/``) of the study's
parent MLflow run; the terminal shows the table and the recommendation.

The rule: among the depths with at least one complete trial, take the best validation
accuracy; recommend the depth with the shortest (median) training time whose best validation
accuracy is within ``tolerance`` points of it.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from sweeper.errors import UserError
from sweeper.report._plots import plots
from sweeper.storage import open_storage
from sweeper.tracking import Kind, Param, State, Tag, Tracker, command_overrides, train_command

log = logging.getLogger("sweeper.report")


@dataclass
class Report:
    study: str
    parent_run_id: str
    table: pd.DataFrame  # one row per depth
    trials: pd.DataFrame  # one row per trial
    recommended: dict[str, Any] | None
    explanation: str
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None


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
        raise UserError(f"No study {what} in MLflow experiment {tracker.experiment_id} at "
                        f"{tracker.uri}. Run one first:  python -m sweeper.run -m")
    return runs[0]


def trial_frame(tracker: Tracker, parent_run_id: str) -> pd.DataFrame:
    """One row per child run of the study: its depth, learning rates, state and metrics."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`{Tag.PARENT}` = '{parent_run_id}'", max_results=50000)
    rows = []
    for r in runs:
        p, m, t = r.data.params, r.data.metrics, r.data.tags
        if not p:  # a trial that failed before its config was logged: no depth to count it at
            continue
        rows.append({
            "trial": int(t[Tag.TRIAL]) if Tag.TRIAL in t else None,
            "run_id": r.info.run_id, "state": t.get(Tag.STATE) or State.of_status(r.info.status),
            "unfrozen": int(p[Param.UNFROZEN]), "num_units": int(p[Param.NUM_UNITS]),
            "lr_head": float(p[Param.LR_HEAD]), "lr_backbone": float(p[Param.LR_BACKBONE]),
            "val_acc": m.get("val_acc", math.nan), "test_acc": m.get("test_acc", math.nan),
            "train_time_s": m.get("train_time_s", math.nan),
            "trainable_params": m.get("trainable_params", math.nan),
            "command": _train_command(t.get(Tag.RERUN_COMMAND, ""), p),
        })
    columns = ["trial", "run_id", "state", "unfrozen", "num_units", "lr_head", "lr_backbone",
               "val_acc", "test_acc", "train_time_s", "trainable_params", "command"]
    return pd.DataFrame(rows, columns=columns).sort_values(["unfrozen", "trial"], na_position="last")


def _train_command(logged: str, params: dict[str, str]) -> str:
    """The command that trains this trial's depth and learning rates with its other overrides."""
    chosen = {k: params[k] for k in (Param.UNFROZEN, Param.LR_HEAD, Param.LR_BACKBONE)}
    base = command_overrides(logged) if logged else []
    keep = [o for o in base if o.split("=", 1)[0].lstrip("+~") not in chosen]
    return train_command([*keep, *(f"{k}={v}" for k, v in chosen.items())])


def depth_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per depth: best trial's accuracies and learning rates, median time, counts."""
    rows = []
    complete = trials[trials.state == State.COMPLETE]
    full = complete[complete.unfrozen == complete.num_units]
    full_time = full.train_time_s.median() if len(full) else math.nan
    for depth, group in trials.groupby("unfrozen"):
        done = group[group.state == State.COMPLETE]
        row = {"unfrozen": depth, "trials": len(group),
               "pruned": int((group.state == State.PRUNED).sum()),
               "failed": int((group.state == State.FAILED).sum())}
        if len(done):
            best = done.loc[done.val_acc.idxmax()]
            time = done.train_time_s.median()
            row.update(best_val_acc=best.val_acc, test_acc=best.test_acc, lr_head=best.lr_head,
                       lr_backbone=best.lr_backbone if depth > 0 else math.nan,
                       train_time_s=time, speedup_vs_full=full_time / time,
                       trainable_params=best.trainable_params, run_id=best.run_id,
                       command=best.command)
        rows.append(row)
    return pd.DataFrame(rows)


def recommend(table: pd.DataFrame, tolerance: float) -> tuple[dict | None, str]:
    """The fastest depth within ``tolerance`` accuracy points of the best, and why."""
    done = table.dropna(subset=["best_val_acc"]) if "best_val_acc" in table else table.iloc[:0]
    if done.empty:
        return None, "No trial completed, so there is nothing to recommend yet."
    best = done.best_val_acc.max()
    close = done[done.best_val_acc >= best - tolerance / 100]
    pick = close.loc[close.train_time_s.idxmin()].to_dict()
    best_row = done.loc[done.best_val_acc.idxmax()]
    depth = int(pick["unfrozen"])
    lrs = f"lr_head={pick['lr_head']:.3g}" + (
        f", lr_backbone={pick['lr_backbone']:.3g}" if depth > 0 else "")
    text = f"Unfreeze the last {depth} units ({lrs}). "
    if int(best_row.unfrozen) == depth:
        text += (f"It was the most accurate depth measured ({best:.1%} validation accuracy) and "
                 f"no faster depth came within {tolerance:g} accuracy points of it; it trains "
                 f"in {pick['train_time_s']:.1f} s")
    else:
        text += (f"The most accurate depth measured was unfrozen={int(best_row.unfrozen)} with "
                 f"{best:.1%} validation accuracy in {best_row.train_time_s:.1f} s; "
                 f"unfrozen={depth} reaches {pick['best_val_acc']:.1%}, within {tolerance:g} "
                 f"accuracy points of it, in {pick['train_time_s']:.1f} s")
    if not math.isnan(pick.get("speedup_vs_full", math.nan)):
        text += f" ({pick['speedup_vs_full']:.1f}x faster than fine-tuning every unit)"
    text += (". The rule picks the fastest depth whose accuracy is that close to the best: "
             "unfreezing more units would cost training time without a measurable gain on "
             "this data, unfreezing fewer would cost accuracy.")
    return pick, text


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

def _markdown(r: Report, figures: list[str], tolerance: float) -> str:
    t = r.table
    lines = [f"# Freeze-depth report: {r.study}", "",
             f"MLflow parent run `{r.parent_run_id}`; {len(r.trials)} trials "
             f"({int((r.trials.state == State.COMPLETE).sum())} complete, "
             f"{int((r.trials.state == State.PRUNED).sum())} pruned, "
             f"{int((r.trials.state == State.FAILED).sum())} failed).", "",
             "## Recommendation", "", r.explanation, ""]
    if r.recommended:
        lines += ["Train it with:", "", "```bash", r.recommended["command"], "```", ""]
    lines += [f"Rule: the fastest depth (median training time over its complete trials) whose "
              f"best validation accuracy is within {tolerance:g} points of the best depth's.", "",
              "## Per depth", "",
              "| unfrozen | best val acc | its test acc | lr_head | lr_backbone | train time (s, median) "
              "| speed-up vs full | trainable params | trials | pruned | failed |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)  # noqa: E731
    for _, row in t.iterrows():
        g = row.get
        lines.append(
            f"| {int(row.unfrozen)} | {fmt(g('best_val_acc'), '.3f')} | {fmt(g('test_acc'), '.3f')} "
            f"| {fmt(g('lr_head'), '.3g')} | {fmt(g('lr_backbone'), '.3g')} "
            f"| {fmt(g('train_time_s'), '.2f')} | {fmt(g('speedup_vs_full'), '.2f')} "
            f"| {fmt(g('trainable_params'), ',.0f')} | {int(row.trials)} | {int(row.pruned)} "
            f"| {int(row.failed)} |")
    lines.append("")
    if r.notes:
        lines += ["## What is missing", "", *[f"- {n}" for n in r.notes], ""]
    titles = {"pareto.png": "Training time against validation accuracy",
              "depth.png": "Accuracy and time by depth",
              "importance.png": "Hyperparameter importances"}
    for p in figures:
        lines += [f"## {titles[p]}", "", f"![{titles[p]}]({p})", ""]
    return "\n".join(lines)


def make_report(cfg: DictConfig, study: str | None = None, parent_run: str | None = None,
                tolerance: float = 1.0, folder: Path | None = None, *,
                optuna_study: Any = None, storage: str | None = None) -> Report:
    """Build, write and log the report of a study (see the module docstring for the rule).

    ``optuna_study`` (or ``storage`` to load it from) gives parameter importances; without
    them the storage named on the parent run is tried.
    """
    tracker = Tracker(cfg.tracking)
    parent = find_parent(tracker, study, parent_run)
    name = parent.data.tags.get(Tag.STUDY) or parent.info.run_name
    trials = trial_frame(tracker, parent.info.run_id)
    notes = []
    if trials.empty:
        notes.append("The study has no trials yet.")
        table = pd.DataFrame(columns=["unfrozen", "trials", "pruned", "failed"])
    else:
        table = depth_table(trials)
        num_units = int(trials.num_units.max())
        measured = set(table.dropna(subset=["best_val_acc"]).unfrozen) if "best_val_acc" in table else set()
        unmeasured = sorted(set(range(num_units + 1)) - measured)
        if unmeasured:
            notes.append(f"Depths without a complete trial: {unmeasured}.")
        if num_units not in measured:
            notes.append("Full fine-tuning (unfrozen=num_units) was not measured: no speed-up "
                         "against it can be given.")
        if (trials.state == State.PRUNED).any():
            notes.append("Pruned trials stopped early: they count in 'trials' and 'pruned' but "
                         "not in the accuracy or time columns.")
        if (trials.state == State.FAILED).any():
            notes.append("Failed trials (see their MLflow runs' `error` tag) are left out.")
        if len(trials[trials.state == State.COMPLETE]) < 3:
            notes.append("Fewer than 3 complete trials: the recommendation rests on little data.")
    recommended, explanation = recommend(table, tolerance)
    if optuna_study is None:
        optuna_study = _load_study(parent, storage)
    if optuna_study is None:
        notes.append("The Optuna study was not reachable: no parameter importances.")
    elif len(optuna_study.directions) == 1:
        notes.append("Single-objective study: training time was recorded but not optimised.")
    folder = folder or Path(cfg.paths.studies) / name / "report"
    folder.mkdir(parents=True, exist_ok=True)
    report = Report(name, parent.info.run_id, table, trials, recommended, explanation, notes,
                    folder)
    written = plots(trials, folder, optuna_study) if not trials.empty else []
    if "importance.png" not in written and optuna_study is not None:
        notes.append("Too few complete trials or varied parameters for importances.")
    (folder / "report.md").write_text(_markdown(report, written, tolerance))
    table.to_csv(folder / "depths.csv", index=False)
    tracker.client.log_artifacts(parent.info.run_id, str(folder), "report")
    return report


def show(report: Report) -> None:
    """Print the table and the recommendation to the terminal."""
    from rich.console import Console
    from rich.table import Table

    # Off a terminal (logs, CI) rich assumes 80 columns and would cut the table's headers.
    console = Console() if sys.stdout.isatty() else Console(width=140)
    table = Table(title=f"Study {report.study}: one row per freeze depth")
    cols = [("unfrozen", "d"), ("best_val_acc", ".3f"), ("test_acc", ".3f"), ("lr_head", ".3g"),
            ("lr_backbone", ".3g"), ("train_time_s", ".2f"), ("speedup_vs_full", ".2f"),
            ("trials", "d"), ("pruned", "d")]
    for c, _ in cols:
        table.add_column(c, justify="right")
    for _, row in report.table.iterrows():
        cells = []
        for c, f in cols:
            v = row.get(c)
            ok = v is not None and not (isinstance(v, float) and math.isnan(v))
            cells.append(format(int(v) if f == "d" else v, f) if ok else "–")
        chosen = report.recommended and row.unfrozen == report.recommended["unfrozen"]
        style = "bold green" if chosen else None
        table.add_row(*cells, style=style)
    console.print(table)
    console.print(f"[bold]Recommendation:[/bold] {report.explanation}")
    if report.recommended:
        console.print(f"Train it:  {report.recommended['command']}")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"Report: {report.folder / 'report.md'}")
