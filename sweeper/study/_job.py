"""One trial of a study, run where the job runs (in the sweep process or a launcher's worker).

The job owns its trial: it reports every epoch's val_acc (for pruning), keeps the trial's
heartbeat, and tells Optuna the result itself, so a trial finishes correctly even if the sweep
that launched it is gone. The sweep process only backs it up when the job never got that far.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from sweeper import timing
from sweeper.errors import log_trace
from sweeper.states import StateStore
from sweeper.storage import open_storage
from sweeper.study import _trials
from sweeper.study._mlflow import trial_runs, trial_tags
from sweeper.study._schema import check_settings
from sweeper.study._settings import make_pruner, settings_in
from sweeper.tracking import Run, State, Tag, Tracker
from sweeper.train import EpochStats
from sweeper.trial import run_trial

log = logging.getLogger("sweeper.study")

# What a complete trial's Optuna user attrs hold of its result (of sweeper.trial.RESULTS): the
# depth sampler reads val_images, the Pareto table the others.
USER_ATTRS = ("best_val_acc", "train_time_s", "time_per_epoch_s", "trainable_params",
              "val_images")

# Studies whose sweep runs in this process (sweeper.study.StudyRunner): its own reads of the
# kept trained parts wait for this process's pending writes (sweeper.states.StateStore).
_SWEPT_HERE: set[str] = set()


def swept_here(study_name: str) -> None:
    """Say that study ``study_name``'s sweep runs in this process."""
    _SWEPT_HERE.add(study_name)


def hydra_trial(cfg: DictConfig) -> tuple[DictConfig, int] | None:
    """When this Hydra job is a trial of a study: the study's settings (resolved against the
    task config ``cfg``) and the trial's number; else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().get("sweeper")
    if sweeper is None or sweeper.get("trial") is None:
        return None
    settings = check_settings(settings_in(cfg, sweeper), cfg,
                              choices=HydraConfig.get().runtime.choices, storage=False)
    return settings, int(sweeper.trial)


def run_job(cfg: DictConfig, settings: DictConfig, number: int) -> dict[str, Any]:
    """Train trial ``number`` of the study in ``settings`` with config ``cfg``; tell Optuna.

    Returns the trial's metrics with ``state`` (complete, pruned or failed) and ``error``.
    """
    storage = open_storage(str(settings.storage))
    name = str(settings.study_name)
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(),
                              pruner=make_pruner(settings.get("pruner")))
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(name), number)
    trial = optuna.Trial(study, trial_id)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    objectives = list(settings.objectives)
    prune = len(objectives) == 1 and not isinstance(study.pruner, optuna.pruners.NopPruner)
    epochs = int(cfg.trainer.epochs)
    heartbeat = _trials.Heartbeat(storage, float(settings.heartbeat_interval))
    heartbeat.add(trial_id)

    time = timing.TrialTime()

    def on_epoch(s: EpochStats) -> None:
        storage.set_trial_system_attr(trial_id, _trials.PROGRESS,
                                      {"epoch": s.epoch, "epochs": epochs, "val_acc": s.val_acc,
                                       "training_s": time.training_s})
        if prune:
            trial.report(s.val_acc, s.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {s.epoch}/{epochs} "
                                         f"(val_acc {s.val_acc:.4f})")

    tracker = Tracker(cfg.tracking)
    try:
        result = run_trial(cfg, parent_run_id=parent, tags=trial_tags(name, number),
                           on_epoch=on_epoch, time=time, keep=kept_states(cfg, settings))
    except optuna.TrialPruned as e:
        _set_run_id(trial, tracker, parent, number)
        trial.set_user_attr("pruned", str(e))
        study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        log.info("trial %d %s", number, e)
        return {"state": State.PRUNED, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - any failure of the trial is recorded, not fatal
        reason = f"{type(e).__name__}: {e}"
        log.error("trial %d failed: %s", number, " ".join(reason.split()))  # one line
        log_trace(log, e, f"trial {number} failed")
        _trials.fail(study, storage, trial_id, number, reason, tracker, parent)
        return {"state": State.FAILED, "error": reason}
    finally:
        heartbeat.close()
        if name not in _SWEPT_HERE:  # the sweep that reads the kept part is another process
            StateStore.written()
    trial.set_user_attr("mlflow_run_id", result["run_id"])
    # test_acc only where the trial measured it (else the study does, at its end)
    for key in (*USER_ATTRS, *(("test_acc",) if "test_acc" in result else ())):
        trial.set_user_attr(key, result[key])  # a result without one is a bug: fail loudly
    values = [float(result[o]) for o in objectives]
    told = study.tell(number, values, skip_if_finished=True)
    if told.state != TrialState.COMPLETE:  # declared lost meanwhile (no heartbeat seen)
        log.warning("trial %d finished after another sweep had declared it lost; its result "
                    "stays out of the study (MLflow run %s tagged state=lost)", number,
                    result["run_id"])
        Run(tracker.client, result["run_id"]).tags({Tag.STATE: State.LOST})
        return {"state": State.LOST, **result}
    return {"state": State.COMPLETE, **result}


def kept_states(cfg: DictConfig, settings: DictConfig) -> StateStore | None:
    """Where the study's trials keep their trained parts, leaving their test evaluation to
    the study's end; None when a trial must measure ``test_acc`` at once (an objective)."""
    if "test_acc" in settings.objectives:
        return None
    return StateStore.for_study(cfg.paths, str(settings.study_name))


def _set_run_id(trial: optuna.Trial, tracker: Tracker, parent: str | None, number: int) -> None:
    runs = trial_runs(tracker, parent, number) if parent else []
    if runs:
        trial.set_user_attr("mlflow_run_id", runs[0].info.run_id)
