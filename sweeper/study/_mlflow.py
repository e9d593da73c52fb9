"""MLflow side of a study: the parent run, trial runs found by tag, the Pareto table.

One parent run per study (tag ``sweeper.kind=study``); each trial is a child run tagged
``optuna.study_name`` and ``optuna.trial_number`` (see :func:`sweeper.trial.run_trial`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.tracking import Kind, Run, State, Tag, Tracker, command_line, environment_tags

STATE = {TrialState.COMPLETE: State.COMPLETE, TrialState.PRUNED: State.PRUNED,
         TrialState.FAIL: State.FAILED, TrialState.RUNNING: State.RUNNING,
         TrialState.WAITING: State.WAITING}


def trial_tags(study_name: str, number: int) -> dict[str, str]:
    return {Tag.KIND: Kind.TRIAL, Tag.STUDY: study_name, Tag.TRIAL: str(number)}


def trial_runs(tracker: Tracker, parent_run_id: str, number: int) -> list[Any]:
    """The MLflow runs of trial ``number`` under ``parent_run_id`` (normally one)."""
    return tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=(f"tags.`{Tag.PARENT}` = '{parent_run_id}' "
                       f"and tags.`{Tag.TRIAL}` = '{number}'"))


def fail_trial_runs(tracker: Tracker, parent_run_id: str | None, study_name: str, number: int,
                    reason: str, overrides: Sequence[str] = (),
                    state: State = State.FAILED) -> str | None:
    """End the trial's runs that are not already failed or killed in ``state`` with
    ``reason``; create one if it has none.

    A trial that failed before its run existed (a bad override, a config that does not
    compose) still gets a FAILED child run, so MLflow shows every trial with its reason.
    Returns the run id.
    """
    if parent_run_id is None:
        return None
    runs = trial_runs(tracker, parent_run_id, number)
    for r in runs:
        # FINISHED too: a run that ended before its job could tell Optuna (killed in between)
        # is not the study's result; the trial is failed, so is its run.
        if r.info.status in ("RUNNING", "FINISHED"):
            Run(tracker.client, r.info.run_id).finish(state, reason)
    if runs:
        return runs[0].info.run_id
    run = tracker.start(f"t{number:03d}", tags={**trial_tags(study_name, number),
                                                 Tag.OVERRIDES: " ".join(overrides)},
                        parent_run_id=parent_run_id)
    run.finish(state, reason)
    return run.run_id


def start_parent(tracker: Tracker, study_name: str, storage: str, params: Mapping[str, Any],
                 overrides: Sequence[str], config_yaml: str) -> Run:
    run = tracker.start(study_name, tags={
        Tag.KIND: Kind.STUDY,
        Tag.STUDY: study_name,
        Tag.STORAGE: storage,
        Tag.OVERRIDES: " ".join(overrides),
        Tag.COMMAND: command_line(),
        **environment_tags(),
    })
    run.params(params)
    run.text(config_yaml, "config.yaml")
    return run


def reopen(tracker: Tracker, run_id: str) -> Run:
    """The parent run, back to RUNNING if an earlier sweep had ended it, without the error
    that ended it (``interrupted; run the same command to resume``: resuming is that)."""
    run = tracker.client.get_run(run_id)
    if run.info.status != "RUNNING":
        tracker.client.update_run(run_id, status="RUNNING")
    if Tag.ERROR in run.data.tags:
        tracker.client.delete_tag(run_id, Tag.ERROR)
    return Run(tracker.client, run_id)


def _row(t: FrozenTrial, names: Sequence[str],
         test_acc: Mapping[int, float] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"trial": t.number, "state": str(STATE.get(t.state, t.state.name.lower()))}
    for i, name in enumerate(names):
        row[name] = t.values[i] if t.values is not None and i < len(t.values) else None
    row.update({"test_acc": (test_acc or {}).get(t.number, t.user_attrs.get("test_acc"))})
    row.update(t.params)
    row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id")
    return row


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's Pareto set: its best trials (the best one for a single objective)."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def pareto_rows(study: optuna.Study, names: Sequence[str],
                test_acc: Mapping[int, float] | None = None) -> list[dict[str, Any]]:
    """The Pareto set's rows (:func:`pareto_trials`), by first objective."""
    rows = [_row(t, names, test_acc) for t in pareto_trials(study)]
    return sorted(rows, key=lambda r: (r.get(names[0]) is None, r.get(names[0])),
                  reverse=study.directions[0] == optuna.study.StudyDirection.MAXIMIZE)


def _csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def summarize(run: Run, study: optuna.Study, names: Sequence[str],
              test_acc: Mapping[int, float] | None = None,
              metrics: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Log the Pareto set (``pareto.json`` table, ``pareto.csv``), every trial
    (``trials.csv``) and summary metrics (with ``metrics``) on the parent run; returns the
    Pareto rows. ``test_acc``: test accuracies by trial number measured after the trials
    (for those the Optuna trial does not hold)."""
    trials = study.get_trials(deepcopy=False)
    rows = pareto_rows(study, names, test_acc)
    states = [t.state for t in trials]
    metrics = {
        **(metrics or {}),
        "n_trials_complete": states.count(TrialState.COMPLETE),
        "n_trials_pruned": states.count(TrialState.PRUNED),
        "n_trials_failed": states.count(TrialState.FAIL),
        "pareto_size": len(rows),
    }
    done = [t for t in trials if t.datetime_complete and t.datetime_start]
    if done:
        metrics["study_wall_time_s"] = (max(t.datetime_complete for t in done)
                                        - min(t.datetime_start for t in done)).total_seconds()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    for i, (name, direction) in enumerate(zip(names, study.directions, strict=True)):
        if complete:
            pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
            metrics[f"best_{name}"] = pick(t.values[i] for t in complete)
    run.metrics(metrics)
    if rows:
        columns = list(dict.fromkeys(c for r in rows for c in r))
        run.client.log_table(run.run_id, {c: [r.get(c) for r in rows] for c in columns},
                             "pareto.json")
        run.text(_csv(rows), "pareto.csv")
    if trials:
        run.text(_csv([_row(t, names, test_acc) for t in trials]), "trials.csv")
    return rows
