"""The training loop: the trainable suffix on its feeds, evaluated on val after every epoch.

One readable loop (:func:`fit`): batch, forward under autocast, backward, optimizer step; the
epoch's training steps and its evaluation are timed by :mod:`sweeper.timing`, which defines
every time metric. On a GPU the train and val rows are placed once per trial
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
from sweeper.device import autocast, rows_budget
from sweeper.errors import UserError
from sweeper.feeds import Feed, Feeds, image_feed
from sweeper.model import FreezeNet

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

    def metrics(self) -> dict[str, float]:
        """The per-epoch metrics of a run (MLflow step = epoch)."""
        return {"train_loss": self.train_loss, "train_acc": self.train_acc,
                "val_acc": self.val_acc, "epoch_time_s": self.epoch_time_s,
                "images_per_s": self.images_per_s}


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


SCHEDULES = ("cosine", "constant")  # optim.schedule


def make_optimizer(model: FreezeNet, optim: DictConfig, steps: int):
    """The configured torch optimizer over trainable parameters only, and its LR schedule."""
    groups = model.param_groups(float(optim.lr_head), float(optim.lr_backbone))
    opt = instantiate(optim.optimizer)(groups, lr=float(optim.lr_head),
                                       weight_decay=float(optim.weight_decay))
    if optim.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    elif optim.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise UserError(f"optim.schedule={optim.schedule!r}: use one of {', '.join(SCHEDULES)}.")
    return opt, sched


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


def fit(model: FreezeNet, data: Data, trainer: DictConfig, optim: DictConfig,
        device: torch.device, on_epoch: Callable[[EpochStats], None] | None = None,
        feeds: Feeds | None = None, time: timing.TrialTime | None = None) -> FitResult:
    """Train ``model`` on ``data.train`` for ``trainer.epochs``, evaluating on val each epoch.

    ``on_epoch`` is called after every epoch with its stats (for logging, progress and
    pruning: it may raise to stop the trial). ``feeds`` says how train and val reach the
    trainable suffix (:func:`sweeper.feeds.for_trial`: cached frozen-prefix outputs, or images
    through the frozen prefix); without it, images run through the whole model every step.
    ``time`` collects the epochs' times (default: charged the feeds' fill costs only).
    """
    bs, n = int(trainer.batch_size), len(data.train)
    # A trailing batch of one image breaks BatchNorm in train mode: drop it.
    n_used = n - 1 if n % bs == 1 and n > 1 else n
    steps_per_epoch = math.ceil(n_used / bs)
    opt, sched = make_optimizer(model, optim, steps_per_epoch * int(trainer.epochs))
    normalize = data.normalize.to(device)
    if feeds is None:
        feeds = Feeds(*(image_feed(model, s, normalize) for s in (data.train, data.val, data.test)))
    result = FitResult(time if time is not None else feeds.time())
    # Rows every epoch reads go to the GPU once where they fit (train first), not per batch.
    budget = rows_budget(device, feeds.device_budget_mb)
    with timing.measure(device) as copy:
        train = feeds.train.on(device, budget)
    result.time.train_copy_s = copy.s
    if train is not feeds.train:
        budget -= train.size_bytes
    with timing.measure(device) as copy:
        val = feeds.val.on(device, budget)
    result.time.val_copy_s = copy.s
    # The trainable suffix is all autograd sees; compiling it is optional (trainer.compile).
    suffix = torch.compile(model.forward_trainable) if trainer.get("compile") else model.forward_trainable
    gen = torch.Generator().manual_seed(int(trainer.seed))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(int(trainer.epochs)):
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        with timing.measure(device) as steps:
            order = torch.randperm(n, generator=gen)[:n_used].to(train.rows.device)
            for start in range(0, n_used, bs):
                # x: cached prefix outputs, or images that prepare() runs through the frozen prefix
                x, y = train.batch(order[start:start + bs], device)
                with autocast(device, bool(trainer.amp)):
                    logits = suffix(train.prepare(x))
                    loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
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
            val_acc = evaluate(model, val, normalize, device, bs * 4, bool(trainer.amp))
        result.time.add_epoch(steps.s, evaluation.s)
        stats = EpochStats(epoch + 1, train_loss, correct.item() / n_used, val_acc, steps.s,
                           evaluation.s, timing.images_per_s(n_used, steps.s))
        result.epochs.append(stats)
        log.info("epoch %d/%d  loss %.4f  train_acc %.3f  val_acc %.3f  %.2fs  %.0f img/s",
                 stats.epoch, trainer.epochs, stats.train_loss, stats.train_acc, stats.val_acc,
                 stats.epoch_time_s, stats.images_per_s)
        if on_epoch is not None:
            on_epoch(stats)
    return result
