"""The training loop: the trainable suffix on its feeds, evaluated on val after every epoch.

One readable loop (:func:`fit`): at the top of each step the freeze strategy's schedule
(:mod:`sweeper.schedule`) says how many units train, and when that changes the model, its
optimizer and the feeds follow; then batch, forward under autocast, backward, optimizer step.
The epoch's training steps, the switches and the evaluation are timed by :mod:`sweeper.timing`,
which defines every time metric. On a GPU the train and val rows are placed once per trial
(:mod:`sweeper.device`), and nothing in the step loop waits for the GPU: losses and accuracies
are summed on the device and read once per epoch.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from sweeper import timing
from sweeper.data import Data, Normalize, Split
from sweeper.device import as_input, autocast, gather
from sweeper.errors import UserError
from sweeper.feeds import Feed, Feeds, image_feed
from sweeper.model import FreezeNet
from sweeper.schedule import Schedule, check_layer_decay, depth_schedule

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the learning rate is too high for this setting."""


@dataclass
class EpochStats:
    """One epoch's results; its time metrics are defined in :mod:`sweeper.timing`."""

    epoch: int
    train_loss: float
    train_acc: float
    val_acc: float
    epoch_time_s: float  # training steps only
    eval_time_s: float
    images_per_s: float
    trainable_units: int  # backbone units trained in the epoch (at its first step)
    trainable_params: int  # ... and the parameters they and the head hold

    def metrics(self) -> dict[str, float]:
        """The per-epoch metrics of a run (MLflow step = epoch)."""
        return {"train_loss": self.train_loss, "train_acc": self.train_acc,
                "val_acc": self.val_acc, "epoch_time_s": self.epoch_time_s,
                "images_per_s": self.images_per_s, "trainable_units": self.trainable_units,
                "trainable_params": self.trainable_params}


@dataclass
class FitResult:
    time: timing.TrialTime  # train_time_s, eval_time_s, ...
    epochs: list[EpochStats] = field(default_factory=list)

    @property
    def val_acc(self) -> float:
        return self.epochs[-1].val_acc

    @property
    def best_val_acc(self) -> float:
        return max(e.val_acc for e in self.epochs)


@torch.no_grad()
def evaluate(model: FreezeNet, split: Split | Feed, normalize: Normalize, device: torch.device,
             batch_size: int, amp: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (model put in eval mode, then restored).

    ``split`` is images (run through ``normalize`` and the whole model) or a :class:`Feed`
    (such as cached frozen-prefix outputs; ``normalize`` is then unused).
    """
    feed = split if isinstance(split, Feed) else image_feed(model, split, normalize)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in feed.batches(batch_size, device):
        with autocast(device, amp):
            correct += (model.forward_trainable(feed.prepare(x)).argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / len(feed)


def reestimate_batchnorm(model: FreezeNet, split: Split, normalize: Normalize,
                         device: torch.device, batch_size: int) -> tuple[int, float]:
    """The frozen units' BatchNorm statistics re-estimated on ``split``'s images (un-augmented,
    :meth:`FreezeNet.adapt_batchnorm`); returns how many layers, and the seconds it took."""
    normalize = normalize.to(device)
    images = split.images
    with timing.measure(device) as spent:
        batches = (as_input(normalize(gather(images, slice(i, i + batch_size), device)))
                   for i in range(0, len(images), batch_size))
        found = model.adapt_batchnorm(batches)
    return found, spent.s


def make_optimizer(model: FreezeNet, optim: DictConfig) -> torch.optim.Optimizer:
    """The configured torch optimizer over trainable parameters only: the head's group and one
    group per trainable unit, at ``optim.lr_backbone`` times ``optim.layer_decay`` per unit
    below the top (:meth:`FreezeNet.param_groups`); :func:`set_learning_rates` schedules them."""
    groups = model.param_groups(float(optim.lr_head), float(optim.lr_backbone),
                                check_layer_decay(optim))
    return instantiate(optim.optimizer)(groups, lr=float(optim.lr_head),
                                        weight_decay=float(optim.weight_decay))


def set_learning_rates(opt: torch.optim.Optimizer, schedule: Schedule, step: int) -> None:
    """Every group's rate at ``step``: its base rate times the schedule's factor for its unit."""
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * schedule.lr_factor(group["unit"], step)


def follow_units(opt: torch.optim.Optimizer, model: FreezeNet, optim: DictConfig) -> None:
    """Make ``opt`` hold exactly the model's trainable units, after the cut moved.

    A unit that froze leaves with its optimizer state (momentum, Adam moments); a unit that
    was unfrozen joins with a fresh one; the other groups and their state stay as they are.
    """
    trainable = set(range(model.cut, model.num_units))
    for group in [g for g in opt.param_groups if g["unit"] is not None and g["unit"] not in trainable]:
        for p in group["params"]:
            opt.state.pop(p, None)
        opt.param_groups.remove(group)
    present = {g["unit"] for g in opt.param_groups}
    for i in sorted(trainable - present):
        opt.add_param_group(model.unit_group(i, float(optim.lr_backbone), check_layer_decay(optim)))


def steps_per_epoch(n: int, batch_size: int) -> tuple[int, int]:
    """(images an epoch trains on, optimizer steps per epoch) for ``n`` training images: a
    trailing batch of one image breaks BatchNorm in train mode, so it is dropped."""
    n_used = n - 1 if n % batch_size == 1 and n > 1 else n
    return n_used, math.ceil(n_used / batch_size)


def reset_peak_memory(device: torch.device) -> None:
    """Start :func:`peak_memory_mb` afresh on a GPU (a process may run many trials); the CPU's
    peak resident memory cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA (since :func:`reset_peak_memory`), else the process's
    peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _units(n: int) -> str:
    """``1 unit``, ``3 units``: for the training log."""
    return f"{n} unit" if n == 1 else f"{n} units"


def fit(model: FreezeNet, data: Data, trainer: DictConfig, optim: DictConfig,
        device: torch.device, on_epoch: Callable[[EpochStats], None] | None = None,
        feeds: Feeds | None = None, time: timing.TrialTime | None = None,
        schedule: Schedule | None = None) -> FitResult:
    """Train ``model`` on ``data.train`` for ``trainer.epochs``, evaluating on val each epoch.

    ``on_epoch`` is called after every epoch with its stats (for logging, progress and
    pruning: it may raise to stop the trial). ``feeds`` says how train and val reach the
    trainable suffix (:func:`sweeper.feeds.for_trial`: cached frozen-prefix outputs, or images
    through the frozen prefix); without it, images run through the whole model every step.
    ``schedule`` says which units train at each step (:mod:`sweeper.schedule`; default: the
    model's frozen prefix for the whole run). ``time`` collects the epochs' times (default:
    charged the feeds' fill costs only).
    """
    bs, epochs, n = int(trainer.batch_size), int(trainer.epochs), len(data.train)
    n_used, per_epoch = steps_per_epoch(n, bs)
    if schedule is None:
        schedule = depth_schedule(model.num_units, model.unfrozen, optim, per_epoch, epochs)
    model.set_unfrozen(schedule.unfrozen(0))
    opt = make_optimizer(model, optim)
    normalize = data.normalize.to(device)
    if feeds is None:
        feeds = Feeds(*(image_feed(model, s, normalize) for s in (data.train, data.val, data.test)))
    result = FitResult(time if time is not None else feeds.time())
    # Rows every epoch reads go to the GPU once where they fit (train first), not per batch.
    result.time.train_copy_s, result.time.val_copy_s = feeds.place(device, model.cut)
    # The trainable suffix is all autograd sees; compiling it is optional (trainer.compile).
    suffix = torch.compile(model.forward_trainable) if trainer.get("compile") else model.forward_trainable
    gen = torch.Generator().manual_seed(int(trainer.seed))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        switch_s = 0.0
        with timing.measure(device) as steps:
            order = torch.randperm(n, generator=gen)[:n_used].to(feeds.train.rows.device)
            for i, start in enumerate(range(0, n_used, bs)):
                step = epoch * per_epoch + i
                if schedule.unfrozen(step) != model.unfrozen:
                    # The strategy moves the cut: the model, its optimizer and the feeds follow
                    # (timed apart from the steps; a per-run cache entry only if an epoch is left).
                    with timing.measure(device) as switch:
                        model.set_unfrozen(schedule.unfrozen(step))
                        follow_units(opt, model, optim)
                        recut = feeds.follow(model, schedule.steps - step >= per_epoch)
                    result.time.add_switch(switch.s, recut)
                    switch_s += switch.s
                    order = order.to(feeds.train.rows.device)
                    log.info("step %d: now training %s; train rows %s", step,
                             _units(model.unfrozen), feeds.train.describe(model.cut))
                if i == 0:  # what this epoch trains (after the switch at its start, if any)
                    trained = (model.unfrozen, model.count_parameters()[0])
                set_learning_rates(opt, schedule, step)
                # x: cached prefix outputs, or images that prepare() runs through the frozen prefix
                x, y = feeds.train.batch(order[start:start + bs], device)
                with autocast(device, bool(trainer.amp)):
                    logits = suffix(feeds.train.prepare(x))
                    loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
        train_loss = loss_sum.item() / n_used
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"Training diverged: the loss became {train_loss} in epoch {epoch + 1}. "
                f"Lower the learning rates (optim.lr_head={optim.lr_head}, "
                f"optim.lr_backbone={optim.lr_backbone})."
            )
        with timing.measure(device) as evaluation:
            val_acc = evaluate(model, feeds.val, normalize, device, bs * 4, bool(trainer.amp))
        epoch_s = steps.s - switch_s
        result.time.add_epoch(epoch_s, evaluation.s)
        stats = EpochStats(epoch + 1, train_loss, correct.item() / n_used, val_acc, epoch_s,
                           evaluation.s, timing.images_per_s(n_used, epoch_s), *trained)
        result.epochs.append(stats)
        log.info("epoch %d/%d  loss %.4f  train_acc %.3f  val_acc %.3f  %.2fs  %.0f img/s  "
                 "%s trained", stats.epoch, epochs, stats.train_loss, stats.train_acc, stats.val_acc,
                 stats.epoch_time_s, stats.images_per_s, _units(stats.trainable_units))
        if on_epoch is not None:
            on_epoch(stats)
    return result
