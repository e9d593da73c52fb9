"""One trial, end to end: config -> data -> model -> training -> metrics, in one MLflow run."""

from __future__ import annotations

import logging
import os
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sweeper import cache, weights
from sweeper import data as data_mod
from sweeper.errors import UserError
from sweeper.freeze import FreezeNet
from sweeper.model import build, check_backbone
from sweeper.pretrain import source_run_id
from sweeper.tracking import Run, Tracker, config_params, environment_tags
from sweeper.train import EpochStats, evaluate, fit, peak_memory_mb, resolve_device

log = logging.getLogger(__name__)

OBJECTIVES = ("val_acc", "train_time_s")


def seed_everything(trainer: DictConfig) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also force deterministic kernels."""
    seed = int(trainer.seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if trainer.get("num_threads"):
        torch.set_num_threads(int(trainer.num_threads))


def _hydra_context() -> tuple[list[str], Path | None]:
    """The task overrides and the ``.hydra/`` folder of the running Hydra job, if any."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [], None
    hc = HydraConfig.get()
    subdir = hc.output_subdir
    folder = Path(hc.runtime.output_dir) / subdir if subdir else None
    return list(hc.overrides.task), folder


def run_trial(cfg: DictConfig, *, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None,
              on_epoch: Callable[[EpochStats], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one freeze depth as described by ``cfg``; log it as one MLflow run.

    Returns the objectives (``val_acc``, ``train_time_s``) and the other final metrics, plus
    ``run_id``. ``on_epoch`` sees every epoch's stats and may raise ``optuna.TrialPruned`` to
    stop the trial, which ends the run KILLED and tagged ``state=pruned``; any other exception
    ends it FAILED with the reason in tag ``error``.
    """
    check_backbone(cfg.backbone, cfg.freeze.unfrozen, cfg.freeze.get("transferred"))
    if (bn_stats := cfg.freeze.get("bn_stats", "source")) not in BN_STATS:
        raise UserError(f"freeze.bn_stats={bn_stats}: use source (the pretrained statistics) or "
                        "target (re-estimated on this dataset's training images).")
    device = resolve_device(str(cfg.trainer.device))
    overrides, hydra_dir = _hydra_context()
    unfrozen = int(cfg.freeze.unfrozen)
    run = Tracker(cfg.tracking).start(
        f"{cfg.backbone.name}-unfrozen{unfrozen}",
        tags={"sweeper.kind": "trial", **(tags or {})}, parent_run_id=parent_run_id)
    try:
        _log_inputs(run, cfg, overrides, hydra_dir)
        seed_everything(cfg.trainer)
        data = data_mod.load(cfg.dataset)
        state, origin = weights.resolve(cfg)
        run.tags({"weights": origin})
        if origin.startswith("source:") and (src_run := source_run_id(origin[len("source:"):])):
            run.tags({"pretrain_run_id": src_run})
        torch.manual_seed(int(cfg.trainer.seed))  # same head init whatever pretraining consumed
        model, _ = build(cfg.backbone, len(data.classes), unfrozen, state, origin,
                         transferred=cfg.freeze.get("transferred"))
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        trainable, frozen = model.count_parameters()
        run.metrics({"trainable_params": trainable, "frozen_params": frozen})
        bn_s = adapt_batchnorm(model, data, bn_stats, device, int(cfg.trainer.batch_size))
        if bn_s is not None:
            run.metrics({"bn_stats_time_s": bn_s})
        # Frozen-prefix outputs computed once (or found) here; fit charges their recorded cost.
        feeds = cache.feeds(model, data, cfg.get("cache"), data_mod.augment(cfg.get("augment")),
                            device, bool(cfg.trainer.amp))
        run.tags(feeds.tags())
        cache_metrics = feeds.metrics()
        run.metrics(cache_metrics)

        def epoch_done(s: EpochStats) -> None:
            run.metrics({"train_loss": s.train_loss, "train_acc": s.train_acc,
                         "val_acc": s.val_acc, "epoch_time_s": s.epoch_time_s,
                         "images_per_s": s.images_per_s}, step=s.epoch)
            if on_epoch is not None:
                on_epoch(s)

        result = fit(model, data, cfg.trainer, cfg.optim, device, on_epoch=epoch_done, feeds=feeds)
        train_time = result.train_time_s + (bn_s or 0.0)  # the re-estimation is training cost
        test_acc = evaluate(model, feeds.test, data.normalize.to(device), device,
                            int(cfg.trainer.batch_size) * 4, bool(cfg.trainer.amp))
        final = {
            "val_acc": result.val_acc,
            "best_val_acc": result.best_val_acc,
            "test_acc": test_acc,
            "train_time_s": train_time,
            "eval_time_s": result.eval_time_s,
            "time_per_epoch_s": train_time / len(result.epochs),
            "images_per_s": len(data.train) * len(result.epochs) / train_time,
            "peak_memory_mb": peak_memory_mb(device),
        }
        run.metrics(final, step=len(result.epochs))
        run.tags({"state": "complete"})
    except BaseException as e:
        import optuna

        if isinstance(e, optuna.TrialPruned):
            run.tags({"state": "pruned"})
            run.end("KILLED", e)
        else:
            run.tags({"state": "killed" if isinstance(e, KeyboardInterrupt) else "failed"})
            run.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", e)
        raise
    run.end()
    log.info("val_acc %.4f  test_acc %.4f  train_time_s %.2f  (MLflow run %s)",
             final["val_acc"], final["test_acc"], final["train_time_s"], run.run_id)
    return {**final, **cache_metrics, "trainable_params": trainable, "frozen_params": frozen,
            "train_steps_s": sum(e.epoch_time_s for e in result.epochs), "run_id": run.run_id}


BN_STATS = ("source", "target")


def adapt_batchnorm(model: FreezeNet, data: data_mod.Data, bn_stats: str, device: torch.device,
                    batch_size: int) -> float | None:
    """``freeze.bn_stats=target``: re-estimate the frozen BatchNorm statistics on the training
    images (un-augmented) before anything is cached; returns the seconds it took (part of the
    trial's training time), or None when nothing was done."""
    if bn_stats == "source" or model.cut == 0:
        return None
    normalize = data.normalize.to(device)
    images = data.train.images
    t0 = time.perf_counter()
    found = model.adapt_batchnorm(normalize(images[i:i + batch_size].to(device))
                                  for i in range(0, len(images), batch_size))
    cache.sync(device)
    spent = time.perf_counter() - t0
    log.info("freeze.bn_stats=target: %d frozen BatchNorm layers re-estimated on %d training "
             "images (%.2fs)", found, len(images), spent)
    return spent


def _log_inputs(run: Run, cfg: DictConfig, overrides: list[str], hydra_dir: Path | None) -> None:
    """What it takes to understand and re-run the trial: config, overrides, code, versions."""
    run.params(config_params(cfg))
    run.tags({
        **environment_tags(),
        "overrides": " ".join(overrides),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "rerun_command": shlex.join(["python", "-m", "sweeper.run", *overrides]),
    })
    run.text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    if hydra_dir is not None and hydra_dir.is_dir():
        run.artifact(hydra_dir, ".hydra")
