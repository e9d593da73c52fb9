"""Where an exported trial's trained weights come from, without training it again if possible.

In this order: the study's store of kept trained parts (:mod:`sweeper.states`; a study keeps
those of the trials its report shows), the copy an earlier export logged on the trial's run
(artifact ``kept_state/<run id>.safetensors``, or ``.pt`` from an earlier version, so that the
model survives the store's pruning and can be exported on another machine), else the trial is
trained again from its logged config (a new MLflow run tagged ``rerun_of``), and the log says so.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from sweeper import data as data_mod
from sweeper.errors import UserError
from sweeper.model import FreezeNet
from sweeper.states import FORMATS, StateMismatch, StateStore
from sweeper.tracking import Tag, Tracker, download_artifact

log = logging.getLogger("sweeper.export")

ARTIFACT = "kept_state"  # the trial run's artifact folder holding its kept trained part


@dataclass
class Trained:
    """A trial's trained model (on the CPU, eval mode), its resolved config and its data."""

    net: FreezeNet
    config: DictConfig
    data: data_mod.Data
    source: str  # in words: where the weights came from
    weights_run_id: str  # the run that trained them (the trial's, or its re-run's)


def _from_store(store: StateStore, run_id: str, source: str) -> Trained:
    from sweeper.trial import load_kept

    net, cfg, data = load_kept(store, run_id, torch.device("cpu"))
    return Trained(net.eval(), cfg, data, source, run_id)


def _artifact(tracker: Tracker, run_id: str, folder: Path) -> tuple[StateStore, str] | None:
    """The kept trained part an earlier export logged on the run, downloaded into ``folder``,
    and the artifact's path."""
    try:
        present = {a.path for a in tracker.client.list_artifacts(run_id, ARTIFACT)}
    except (MlflowException, OSError):
        return None
    for name in (f"{ARTIFACT}/{run_id}{suffix}" for suffix in FORMATS):
        if name in present:
            try:
                path = download_artifact(tracker.client, run_id, name, str(folder))
            except (MlflowException, OSError):
                return None
            return StateStore(Path(path).parent), name
    return None


def keep_on_run(tracker: Tracker, store: StateStore, run_id: str) -> None:
    """Log the kept trained part of ``run_id`` as an artifact of its run (once)."""
    present = {a.path for a in tracker.client.list_artifacts(run_id, ARTIFACT)}
    if f"{ARTIFACT}/{store.path(run_id).name}" not in present:
        tracker.client.log_artifact(run_id, str(store.path(run_id)), ARTIFACT)


def trained(tracker: Tracker, paths: DictConfig, study: str | None, run_id: str,
            retrain: bool = True) -> Trained:
    """The trained model of trial ``run_id`` (of ``study``), from the first place that has it."""
    if study:
        store = StateStore.for_study(paths, study)
        if run_id in store.run_ids():
            try:
                found = _from_store(store, run_id, f"kept state {store.path(run_id)}")
            except StateMismatch as e:
                log.warning("the kept state of run %s does not fit its model (%s)", run_id, e)
            else:
                keep_on_run(tracker, store, run_id)
                return found
    with tempfile.TemporaryDirectory() as tmp:
        found_artifact = _artifact(tracker, run_id, Path(tmp))
        if found_artifact is not None:
            store, name = found_artifact
            try:
                return _from_store(store, run_id, f"artifact {name} of its run")
            except StateMismatch as e:
                log.warning("the kept state logged on run %s does not fit its model (%s)", run_id, e)
        if not retrain:
            raise UserError(f"Run {run_id} has no kept trained part (the study's store and the "
                            "run's artifacts have none): export it with retrain=true to train it "
                            "again from its logged config.")
        return _retrain(tracker, run_id, StateStore(Path(tmp) / "retrained"), paths)


def _retrain(tracker: Tracker, run_id: str, store: StateStore, paths: DictConfig) -> Trained:
    """Train the trial again from its logged config (same seed: on the CPU with
    ``trainer.deterministic`` the same model), keeping its trained part in ``store``."""
    from sweeper.rerun import logged_config
    from sweeper.trial import run_trial

    cfg, original = logged_config(run_id, tracker.uri, paths)
    cfg.tracking.uri = tracker.uri
    cfg.tracking.experiment = original.data.params.get("tracking.experiment",
                                                       cfg.tracking.experiment)
    log.warning("run %s has no kept trained part: training it again from its logged config",
                run_id)
    result = run_trial(cfg, tags={Tag.RERUN_OF: run_id}, keep=store)
    new = result["run_id"]
    before = original.data.metrics.get("val_acc")
    log.info("retrained as MLflow run %s: val_acc %.4f (the trial's: %s)", new,
             result["val_acc"], "none" if before is None else f"{before:.4f}")
    found = _from_store(store, new, f"retrained (MLflow run {new}, rerun_of={run_id})")
    # Kept on the trial's own run too: the next export of the trial finds it there.
    shutil.copyfile(store.path(new), store.path(new).with_stem(run_id))
    keep_on_run(tracker, store, run_id)
    return found
