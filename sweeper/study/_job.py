"""One trial of a study, run where the job runs (in the sweep process or a launcher's worker).

The job owns its trial: it reports every epoch's val_acc (for pruning), keeps the trial's
heartbeat, and tells Optuna the result itself, so a trial finishes correctly even if the sweep
that launched it is gone. The sweep process only backs it up when the job never got that far.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.storages import BaseStorage
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

# A running trial's progress (epoch, val_acc, training time) is written to the study at most
# this often, and once more before the trial is told: one storage write per epoch was about
# a tenth of a short trial's overhead.
PROGRESS_EVERY_S = 1.0


@dataclass(frozen=True)
class SweptHere:
    """What a study's sweep in this process (:class:`sweeper.study.StudyRunner`) shares with
    the jobs it runs in this process (Hydra's basic launcher): its checked settings, its open
    storage and the pruner they name. Such a job neither checks the settings again nor replays
    the journal into a storage of its own, nor keeps a heartbeat of its own (the sweep's
    covers its trial); and the sweep's own reads of the kept trained parts wait for this
    process's pending writes (:class:`sweeper.states.StateStore`), so the job need not."""

    storage_spec: str
    settings: DictConfig
    storage: BaseStorage
    pruner: optuna.pruners.BasePruner


# study name -> the sweep of that study running in this process
_SWEPT_HERE: dict[str, SweptHere] = {}


def swept_here(study_name: str, sweep: SweptHere | None) -> None:
    """Say that study ``study_name``'s sweep runs in this process (``sweep``), or no longer
    (None)."""
    if sweep is None:
        _SWEPT_HERE.pop(study_name, None)
    else:
        _SWEPT_HERE[study_name] = sweep


def _sweep_here(study_name: str, storage_spec: str) -> SweptHere | None:
    """This process's sweep of ``study_name`` on ``storage_spec``, if it runs here."""
    sweep = _SWEPT_HERE.get(study_name)
    return sweep if sweep is not None and sweep.storage_spec == storage_spec else None


def hydra_trial(cfg: DictConfig) -> tuple[DictConfig, int] | None:
    """When this Hydra job is a trial of a study: the study's settings (resolved against the
    task config ``cfg``) and the trial's number; else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().get("sweeper")
    if sweeper is None or sweeper.get("trial") is None:
        return None
    here = _sweep_here(str(sweeper.get("study_name")), str(sweeper.get("storage")))
    if here is not None:  # the settings its sweep checked
        return here.settings, int(sweeper.trial)
    settings = check_settings(settings_in(cfg, sweeper), cfg,
                              choices=HydraConfig.get().runtime.choices, storage=False)
    return settings, int(sweeper.trial)


def run_job(cfg: DictConfig, settings: DictConfig, number: int) -> dict[str, Any]:
    """Train trial ``number`` of the study in ``settings`` with config ``cfg``; tell Optuna.

    Returns the trial's metrics with ``state`` (complete, pruned or failed) and ``error``.
    """
    name = str(settings.study_name)
    here = _sweep_here(name, str(settings.storage))
    storage = here.storage if here else open_storage(str(settings.storage))
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(),
                              pruner=here.pruner if here else make_pruner(settings.get("pruner")))
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(name), number)
    trial = optuna.Trial(study, trial_id)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    objectives = list(settings.objectives)
    prune = len(objectives) == 1 and not isinstance(study.pruner, optuna.pruners.NopPruner)
    epochs = int(cfg.trainer.epochs)
    heartbeat = None if here else _trials.Heartbeat(storage, float(settings.heartbeat_interval))
    if heartbeat is not None:
        heartbeat.add(trial_id)

    time = timing.TrialTime()
    last: dict[str, Any] = {"stats": None, "written": None, "at": -PROGRESS_EVERY_S}

    def write_progress(s: EpochStats) -> None:
        storage.set_trial_system_attr(trial_id, _trials.PROGRESS,
                                      {"epoch": s.epoch, "epochs": epochs, "val_acc": s.val_acc,
                                       "training_s": time.training_s})
        last.update(written=s, at=timing.now())

    def on_epoch(s: EpochStats) -> None:
        last["stats"] = s
        if timing.now() - last["at"] >= PROGRESS_EVERY_S:
            write_progress(s)
        if prune:
            trial.report(s.val_acc, s.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {s.epoch}/{epochs} "
                                         f"(val_acc {s.val_acc:.4f})")

    def final_progress() -> None:
        """The last epoch's progress, with the trial's whole training time (the sweep reads
        it for the trial's overhead), before the trial is told."""
        if last["stats"] is not None and last["written"] is not last["stats"]:
            write_progress(last["stats"])

    tracker = Tracker(cfg.tracking)
    try:
        result = run_trial(cfg, parent_run_id=parent, tags=trial_tags(name, number),
                           on_epoch=on_epoch, time=time, keep=kept_states(cfg, settings))
    except optuna.TrialPruned as e:
        final_progress()
        _set_run_id(trial, tracker, parent, number)
        trial.set_user_attr("pruned", str(e))
        study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        log.info("trial %d %s", number, e)
        return {"state": State.PRUNED, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - any failure of the trial is recorded, not fatal
        final_progress()
        reason = f"{type(e).__name__}: {e}"
        log.error("trial %d failed: %s", number, " ".join(reason.split()))  # one line
        log_trace(log, e, f"trial {number} failed")
        _trials.fail(study, storage, trial_id, number, reason, tracker, parent)
        return {"state": State.FAILED, "error": reason}
    finally:
        if heartbeat is not None:
            heartbeat.close()
        if here is None:  # the sweep that reads the kept part is another process
            StateStore.written()
    final_progress()
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
