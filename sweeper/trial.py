"""One trial, end to end: config -> data -> model -> training -> metrics, in one MLflow run.

:func:`run_trial` trains and evaluates one configuration. Inside a study it may leave its test
evaluation to later: it keeps its trained part (:mod:`sweeper.states`) and :func:`evaluate_kept`
evaluates it when the study ends, for the trials the report needs.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sweeper import data as data_mod
from sweeper import feeds, schedule, timing
from sweeper.config import config_yaml, resolved
from sweeper.device import configure, place_model, resolve_device
from sweeper.errors import Interrupted, by_an_interrupt, interruption
from sweeper.model import FreezeNet, build
from sweeper.pretrain import pretrain_if_needed, pretrain_run_id, resolve_weights
from sweeper.states import StateStore
from sweeper.tracking import (
    Kind,
    Run,
    State,
    Tag,
    Tracker,
    command_line,
    config_params,
    environment_tags,
    train_command,
    trial_run_name,
)
from sweeper.train import (
    EpochStats,
    evaluate,
    fit,
    peak_memory_mb,
    reestimate_batchnorm,
    reset_peak_memory,
    steps_per_epoch,
)
from sweeper.validate import check_config

log = logging.getLogger(__name__)


def seed_everything(trainer: DictConfig, device: torch.device) -> None:
    """Seed Python, NumPy and torch; set the process up for ``device`` (with ``deterministic``,
    deterministic kernels; :func:`sweeper.device.configure`)."""
    seed = int(trainer.seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    configure(device, bool(trainer.deterministic))
    if trainer.get("num_threads"):
        torch.set_num_threads(int(trainer.num_threads))


def _hydra_context() -> tuple[list[str], list[str], Path | None]:
    """The running Hydra job's task overrides, the command-line flags that found its configs
    (a user's ``--config-dir``, ``--config-name``, ``hydra.searchpath``: a printed command
    needs them to work as printed), and its ``.hydra/`` folder, if any."""
    from hydra.core.hydra_config import HydraConfig

    from sweeper.config import CONFIG_PATH

    if not HydraConfig.initialized():
        return [], [], None
    hc = HydraConfig.get()
    subdir = hc.output_subdir
    folder = Path(hc.runtime.output_dir) / subdir if subdir else None
    flags = []
    packaged = {CONFIG_PATH, f"file://{CONFIG_PATH}"}
    for source in hc.runtime.config_sources:  # paths without their scheme
        if source.provider == "main" and f"{source.schema}://{source.path}" not in packaged:
            flags.append(f"--config-path={source.path}")
        elif source.provider == "command-line":
            flags.append(f"--config-dir={source.path}")
    if hc.job.config_name != "config":
        flags.append(f"--config-name={hc.job.config_name}")
    flags += [o for o in hc.overrides.hydra if o.split("=", 1)[0].lstrip("+~") == "hydra.searchpath"]
    return list(hc.overrides.task), flags, folder


# A trial's run writes its params, tags and metrics in batches at most this often (one
# transaction each), not one transaction per call, from the process's MLflow writer thread
# while the trial goes on: see sweeper.tracking.Run.
FLUSH_EVERY_S = 1.0

# The final metrics run_trial returns that a study may optimise (hydra.sweeper.objectives, or
# optimized_metric with direction, name them); it returns the cache's counters too.
RESULTS = ("val_acc", "best_val_acc", "test_acc", "train_time_s", "eval_time_s",
           "time_per_epoch_s", "train_steps_s", "peak_memory_mb", "cache_fill_time_s",
           "cache_fill_charged_s", "trainable_params", "frozen_params", "val_images")


def run_trial(cfg: DictConfig, *, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None,
              on_epoch: Callable[[EpochStats], None] | None = None,
              time: timing.TrialTime | None = None,
              keep: StateStore | None = None) -> dict[str, Any]:
    """Train and evaluate one freeze depth or strategy as described by ``cfg``; log it as one
    MLflow run.

    Returns the objectives (``val_acc``, ``train_time_s``) and the other final metrics, plus
    ``run_id``. ``on_epoch`` sees every epoch's stats and may raise ``optuna.TrialPruned`` to
    stop the trial, which ends the run KILLED and tagged ``state=pruned``; any other exception
    ends it FAILED with the reason in tag ``error``. ``time`` collects the trial's times as
    they are measured (so a caller sees them even when the trial stops early).

    With ``keep``, the trial does not evaluate its test split: it keeps its trained part in
    that store under its MLflow run id instead, and the result has no ``test_acc`` (a study
    evaluates the test set of the trials its report needs when it ends, :func:`evaluate_kept`).
    """
    # The config's values, resolved once: the trial reads them (a resolved config reads about
    # four times faster), and its MLflow params and config.yaml are made from them.
    try:
        tree = resolved(cfg)
    except Exception:
        check_config(cfg)  # what the checks say of a config that does not resolve, if anything
        raise
    cfg = OmegaConf.create(tree, flags={"struct": True})
    check_config(cfg)  # again: a config composed in code did not pass Hydra's callback
    strategy = schedule.strategy_of(cfg.freeze)  # checked with its parameters by check_config
    device = resolve_device(str(cfg.trainer.device))
    overrides, flags, hydra_dir = _hydra_context()
    run = Tracker(cfg.tracking).start(
        trial_run_name(str(cfg.backbone.name), str(cfg.dataset.name), int(cfg.freeze.unfrozen),
                       (tags or {}).get(Tag.TRIAL), strategy),
        tags={Tag.KIND: Kind.TRIAL, **(tags or {}), **input_tags(overrides, flags)},
        parent_run_id=parent_run_id, flush_every_s=FLUSH_EVERY_S, background=True)
    time = time if time is not None else timing.TrialTime()
    try:
        text = log_inputs(run, tree, overrides, hydra_dir, flags, tagged=True)
        result = _train_and_test(cfg, run, device, on_epoch, time, keep, text)
        # Inside: a write that failed (background, sweeper.tracking.Run) raises here, and the
        # run is then ended FAILED with it and its batch written, not left RUNNING.
        run.finish(State.COMPLETE)
    except BaseException as e:
        interrupted = by_an_interrupt(e)
        run.finish(_ended_by(e), interruption() if interrupted else e)
        if interrupted and not isinstance(e, Interrupted):
            raise Interrupted(f"Interrupted: the trial's MLflow run {run.run_id} ended KILLED; "
                              "run the same command again to train it.") from None
        raise
    test = f"test_acc {result['test_acc']:.4f}" if "test_acc" in result else "test set when the study ends"
    log.info("val_acc %.4f  %s  train_time_s %.2f  (MLflow run %s)",
             result["val_acc"], test, result["train_time_s"], run.run_id)
    return {**result, "run_id": run.run_id}


def _train_and_test(cfg: DictConfig, run: Run, device: torch.device,
                    on_epoch: Callable[[EpochStats], None] | None, time: timing.TrialTime,
                    keep: StateStore | None, config_text: str) -> dict[str, Any]:
    """The trial's steps, in data-flow order, each logged to ``run`` as soon as it is known
    (``config_text``: the resolved config's YAML, kept with the trained part)."""
    seed_everything(cfg.trainer, device)
    reset_peak_memory(device)
    data = data_mod.load(cfg.dataset)
    if data.skipped:  # dataset.on_bad_image=skip: how many, and which, on the run
        run.metrics({"skipped_images": len(data.skipped)})
        run.text("\n".join(data.skipped) + "\n", "skipped_images.txt")
    time.pretrain_s = pretrain_if_needed(cfg)
    # Which units train at each step: the freeze strategy's schedule, for this data's steps.
    plan = schedule.build(cfg.freeze, cfg.optim, int(cfg.backbone.num_units),
                          steps_per_epoch(len(data.train), int(cfg.trainer.batch_size))[1],
                          int(cfg.trainer.epochs))
    run.tags({Tag.SCHEDULE: schedule.describe(plan)})
    model, origin = build_model(cfg, len(data.classes), device, plan.unfrozen(0))
    run.tags(_origin_tags(origin))
    trainable, frozen = model.count_parameters()
    params = {"trainable_params": trainable, "frozen_params": frozen, "val_images": len(data.val)}
    run.metrics(params)
    run.flush()  # what the trial is, in MLflow before the (maybe long) fills and epochs
    bn_s = adapt_batchnorm(model, data, _bn_stats(cfg), device, int(cfg.trainer.batch_size))
    if bn_s is not None:
        run.metrics({"bn_stats_time_s": bn_s})
    # Frozen-prefix outputs computed once (or found) here; the trial is charged their cost.
    # Test is fed at the lowest cut of the run, so that it fits the model at the end.
    fed = feeds.for_trial(model, data, cfg.get("cache"), data_mod.augment(cfg.get("augment")),
                          device, bool(cfg.trainer.amp), test=keep is None,
                          test_cut=plan.lowest_cut())
    fed.charge(time)
    time.bn_stats_s = bn_s
    run.tags(fed.tags())
    cache_metrics = {**fed.metrics(), **time.cache_metrics()}
    run.metrics(cache_metrics)

    # Without a test pass to follow, the last epoch's metrics wait for the run's end: one
    # write with the final metrics, instead of one more that the end would wait for.
    ends_after = int(cfg.trainer.epochs) if keep is not None else None

    def epoch_done(s: EpochStats) -> None:
        # The caller first (a study's pruning report), then the epoch's metrics, which may
        # hand a batch to the MLflow writer thread: a report made while that thread runs
        # waited for the GIL, 3.9 ms instead of 0.6. A pruned epoch is logged all the same.
        try:
            if on_epoch is not None:
                on_epoch(s)
        finally:
            run.metrics(s.metrics(), step=s.epoch, last=s.epoch == ends_after)

    result = fit(model, data, cfg.trainer, cfg.optim, device, on_epoch=epoch_done, feeds=fed,
                 time=time, schedule=plan)
    final = {"val_acc": result.val_acc, "best_val_acc": result.best_val_acc}
    if keep is None:
        final["test_acc"] = evaluate(model, fed.test, data.normalize.to(device), device,
                                     _eval_batch(cfg), bool(cfg.trainer.amp))
    else:
        # Kept as evaluate_kept rebuilds it: every unit the run trained is part of the kept
        # state, also those a strategy froze again before the end (their weights are this
        # run's); the units below never trained and have their pretrained weights.
        model.set_unfrozen(model.num_units - plan.lowest_cut())
        digests = fed.frozen_digests
        keep.save(run.run_id, model, config_text,
                  digests[:model.cut] if digests is not None and len(digests) >= model.cut
                  else None, background=True)  # the model is not used after this
    final.update({**time.totals(), "peak_memory_mb": peak_memory_mb(device)})
    run.metrics(final, step=len(result.epochs), last=True)
    # The most parameters that trained at once (for a fixed depth: all along).
    most = max(e.trainable_params for e in result.epochs)
    params = {"trainable_params": most, "frozen_params": trainable + frozen - most,
              "val_images": len(data.val)}
    return {**final, **cache_metrics, **params, "train_steps_s": time.train_steps_s}


def _eval_batch(cfg: DictConfig) -> int:
    """The batch size of test evaluation (the same whenever it runs: same numbers)."""
    return int(cfg.trainer.batch_size) * 4


def build_model(cfg: DictConfig, num_classes: int, device: torch.device,
                unfrozen: int | None = None) -> tuple[FreezeNet, str]:
    """The trial's model on ``device`` as ``cfg`` describes it before training, with its last
    ``unfrozen`` units trainable (default: every unit its freeze strategy ever trains,
    :func:`sweeper.schedule.trained_units`), and the origin of its weights (tag ``weights``).
    The same config always gives the same model."""
    if unfrozen is None:
        unfrozen = schedule.trained_units(cfg.freeze, cfg.optim, int(cfg.backbone.num_units),
                                          int(cfg.trainer.epochs))
    state, origin = resolve_weights(cfg)
    torch.manual_seed(int(cfg.trainer.seed))  # same head init whatever pretraining consumed
    model, _ = build(cfg.backbone, num_classes, unfrozen, state, origin,
                     transferred=cfg.freeze.get("transferred"))
    return place_model(model, device), origin


def _origin_tags(origin: str) -> dict[str, str]:
    tags = {Tag.WEIGHTS: origin}
    if pretrained_by := pretrain_run_id(origin):
        tags[Tag.PRETRAIN_RUN_ID] = pretrained_by
    return tags


def load_kept(store: StateStore, key: str,
              device: torch.device) -> tuple[FreezeNet, DictConfig, data_mod.Data]:
    """The trained model of the trial kept as ``key`` in ``store`` (its MLflow run id) on
    ``device``, with its config and data: rebuilt from the kept config (same pretrained
    weights, same frozen units, checked: :class:`sweeper.states.StateMismatch`) and given
    the kept trained part."""
    cfg = store.config(key)
    data = data_mod.load(cfg.dataset)
    model, _ = build_model(cfg, len(data.classes), device)
    store.load(key, model)
    return model, cfg, data


def evaluate_kept(key: str, store: StateStore, tracker: Tracker) -> float:
    """Test accuracy of the trial kept as ``key`` in ``store`` (its MLflow run id), logged on
    its run as ``test_acc``, as :func:`run_trial` would have measured it at its end.

    The model is rebuilt from the kept config (same pretrained weights, same frozen units,
    checked) and given the kept trained part; the test split is fed as the trial would have
    fed it (the frozen-prefix cache at its cut, shared with the study's other trials).
    """
    cfg = store.config(key)
    device = resolve_device(str(cfg.trainer.device))
    seed_everything(cfg.trainer, device)  # the trial's threads and determinism settings
    model, cfg, data = load_kept(store, key, device)
    test = feeds.test_feed(model, data, cfg.get("cache"), device, bool(cfg.trainer.amp))
    test_acc = evaluate(model, test, data.normalize.to(device), device, _eval_batch(cfg),
                        bool(cfg.trainer.amp))
    Run(tracker.client, key).metrics({"test_acc": test_acc}, step=int(cfg.trainer.epochs))
    return test_acc


def _ended_by(error: BaseException) -> State:
    """The state a trial ends in when ``error`` stops it."""
    import optuna

    if isinstance(error, optuna.TrialPruned):
        return State.PRUNED
    return State.KILLED if by_an_interrupt(error) else State.FAILED


def _bn_stats(cfg: DictConfig) -> str:
    """``freeze.bn_stats`` (checked by :mod:`sweeper.validate`; configs from before it keep the
    pretrained statistics)."""
    return str(cfg.freeze.get("bn_stats", "source"))


def adapt_batchnorm(model: FreezeNet, data: data_mod.Data, bn_stats: str, device: torch.device,
                    batch_size: int) -> float | None:
    """``freeze.bn_stats=target``: re-estimate the frozen BatchNorm statistics on the training
    images (un-augmented) before anything is cached; returns the seconds it took (part of the
    trial's training time), or None when nothing was done."""
    if bn_stats == "source" or model.cut == 0:
        return None
    found, spent = reestimate_batchnorm(model, data.train, data.normalize, device, batch_size)
    log.info("freeze.bn_stats=target: %d frozen BatchNorm layers re-estimated on %d training "
             "images (%.2fs)", found, len(data.train), spent)
    return spent


def input_tags(overrides: list[str], flags: list[str] = ()) -> dict[str, str]:
    """The tags that say how the trial came to be: overrides (and the flags that found a
    user's config folders), command, code, versions."""
    return {
        **environment_tags(),
        Tag.OVERRIDES: " ".join(overrides),
        Tag.COMMAND: command_line(),
        Tag.RERUN_COMMAND: train_command([*flags, *overrides]),
    }


def log_inputs(run: Run, tree: dict[str, Any], overrides: list[str], hydra_dir: Path | None,
               flags: list[str] = (), tagged: bool = False) -> str:
    """What it takes to understand and re-run the trial: config (``tree``: the
    :func:`~sweeper.config.resolved` config, for the params and the YAML), overrides, code,
    versions (``tagged``: the run was started with :func:`input_tags` already). Returns the
    resolved config's YAML (``config.yaml`` of the run)."""
    run.params(config_params(tree))
    if not tagged:
        run.tags(input_tags(overrides, flags))
    text = config_yaml(tree)
    run.text(text, "config.yaml")
    if hydra_dir is not None and hydra_dir.is_dir():
        run.artifact(hydra_dir, ".hydra")
    return text
