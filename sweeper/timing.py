"""Time: the one place that reads the clock and composes a trial's totals from what it measured.

Every duration in the package is taken with :func:`measure`, a stopwatch that waits for the
GPU's queued work before it starts and before it stops (a no-op on the CPU), and every total
is composed by :class:`TrialTime`. Each time metric has one definition, the same in a trial
and in a source pretraining:

=====================  ========================================================================
metric                 definition
=====================  ========================================================================
epoch_time_s           per epoch (step = epoch): wall time of the epoch's training steps
                       (gathering batches, forward, backward, optimizer step)
images_per_s           per epoch: images the epoch trained on / its ``epoch_time_s``
train_time_s           what training the configuration costs on its own: the sum of
                       ``epoch_time_s``, plus the recorded fill cost of the cached inputs it
                       trained on, plus ``bn_stats_time_s``, plus on a GPU the one copy of the
                       train rows to the device where they stay for the trial
                       (:mod:`sweeper.device`), plus ``switch_time_s``; so it does not depend
                       on which trials filled the cache before
eval_time_s            the val evaluation after every epoch, plus the recorded fill cost of the
                       cached val inputs and their one copy to the GPU, plus the val part of
                       every switch (the final test evaluation is not counted)
time_per_epoch_s       ``train_time_s`` / epochs
switch_time_s          the freeze strategy's changes of the trainable units mid-run
                       (``progressive``, ``gradual``): the model, the optimizer, and the train
                       rows at the new cut (a per-run entry's fill, measured; a shared entry is
                       charged its recorded cost instead, once: see below)
bn_stats_time_s        re-estimating the frozen BatchNorm statistics (``freeze.bn_stats=target``)
cache_fill_time_s      time this trial actually spent filling cache entries (0 when all were
                       found)
cache_fill_charged_s   the recorded fill costs of the entries the trial uses (train, val, and
                       test when the trial evaluates it)
overhead_per_trial_s   on a study's parent run: what its trials spent outside their training
                       steps, their per-epoch validation and any source pretraining, plus the
                       study's end-of-study test evaluation, per trial (:func:`overhead_per_trial`)
=====================  ========================================================================

``run_trial`` also returns ``train_steps_s``: the sum of ``epoch_time_s``, without charges. The
recorded fill cost of a cache entry is the measured time of computing it from the images; for
an entry derived from a shallower one, the parent's recorded cost plus the derivation
(:func:`fill_cost`). A run that moves through several shared entries of a split (gradual
unfreezing: the head's cut first, then shallower ones) is charged the largest of their
recorded costs: one pass through the deepest prefix yields the rows at every shallower cut
on the way, which is what training that schedule alone would compute.

A trial's *overhead* is the rest of its wall time, from the moment the sweep asks Optuna for
it to the moment its result is recorded: composing its config, building its model and feeds
(cache fills included), tracking, telling Optuna, and its test evaluation. A study evaluates
the test set only for the trials its report needs, once, at its end: that time is shared out
over the trials (:func:`overhead_per_trial`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Recut(Protocol):
    """What a switch of the trainable units cost the feeds (:class:`sweeper.feeds.Recut`)."""

    val_s: float
    train_shared_s: float
    val_shared_s: float
    train_fill_s: float
    val_fill_s: float
    filled_s: float


def sync(device: torch.device | None) -> None:
    """Wait for the GPU's queued work, so that a wall-clock time measures it (no-op on CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stopwatch:
    """Seconds measured by :func:`measure`, set when its block ends."""

    s: float = 0.0


def now() -> float:
    """Seconds on the clock :func:`measure` reads (for intervals: how long since a write)."""
    return time.perf_counter()


@contextmanager
def measure(device: torch.device | None = None) -> Iterator[Stopwatch]:
    """Wall time of the enclosed block, including the GPU work it queued on ``device``::

        with measure(device) as steps:
            train_one_epoch()
        print(steps.s)
    """
    watch = Stopwatch()
    sync(device)
    t0 = time.perf_counter()
    yield watch
    sync(device)
    watch.s = time.perf_counter() - t0


def fill_cost(spent_s: float, parent_cost_s: float = 0.0) -> float:
    """The recorded cost of a cache entry: the time spent computing it, plus the recorded
    cost of the entry it was derived from (0 when computed from the images)."""
    return parent_cost_s + spent_s


def images_per_s(images: int, seconds: float) -> float:
    """Throughput of training steps: ``images`` trained on in ``seconds``."""
    return images / seconds


@dataclass
class TrialTime:
    """The measured parts of a training run's time, and the totals composed from them."""

    train_fill_s: float = 0.0  # recorded fill cost of the cached train inputs (charged)
    val_fill_s: float = 0.0  # ... of the cached val inputs (charged to evaluation)
    test_fill_s: float = 0.0  # ... of the cached test inputs (charged to nothing)
    filled_s: float = 0.0  # time actually spent filling cache entries in this run
    bn_stats_s: float | None = None  # re-estimating frozen BatchNorm statistics; None: not done
    train_copy_s: float = 0.0  # copying the train rows to the GPU once (0 on the CPU)
    val_copy_s: float = 0.0  # ... the val rows
    pretrain_s: float = 0.0  # source pretraining this run had to do first (once per checkpoint)
    steps_s: list[float] = field(default_factory=list)  # each epoch's training steps
    eval_s: list[float] = field(default_factory=list)  # each epoch's val evaluation
    switch_s: list[float] = field(default_factory=list)  # each switch of the trainable units
    val_switch_s: float = 0.0  # ... the val rows' part of the switches

    def add_epoch(self, steps_s: float, eval_s: float) -> None:
        self.steps_s.append(steps_s)
        self.eval_s.append(eval_s)

    def add_switch(self, spent_s: float, recut: Recut) -> None:
        """A switch of the trainable units that took ``spent_s`` in all, ``recut`` of it on the
        feeds: time on shared entries is replaced by their recorded cost (the largest of a
        split's), the val rows' part is evaluation's."""
        self.switch_s.append(spent_s - recut.val_s - recut.train_shared_s)
        self.val_switch_s += recut.val_s - recut.val_shared_s
        self.train_fill_s = max(self.train_fill_s, recut.train_fill_s)
        self.val_fill_s = max(self.val_fill_s, recut.val_fill_s)
        self.filled_s += recut.filled_s

    @property
    def train_steps_s(self) -> float:
        return sum(self.steps_s)

    @property
    def switch_time_s(self) -> float:
        return sum(self.switch_s)

    @property
    def train_time_s(self) -> float:
        return (self.train_steps_s + self.train_fill_s + (self.bn_stats_s or 0.0) + self.train_copy_s
                + self.switch_time_s)

    @property
    def eval_time_s(self) -> float:
        return sum(self.eval_s) + self.val_fill_s + self.val_copy_s + self.val_switch_s

    @property
    def time_per_epoch_s(self) -> float:
        return self.train_time_s / len(self.steps_s)

    @property
    def training_s(self) -> float:
        """What a trial's overhead leaves out: its training steps, its per-epoch validation
        and the source pretraining it did (without the charged fill costs: a fill this trial
        ran is overhead, like the rest of building its feeds)."""
        return self.train_steps_s + sum(self.eval_s) + (self.bn_stats_s or 0.0) + self.pretrain_s

    def totals(self) -> dict[str, float]:
        """The final time metrics of the run (see the table above)."""
        return {"train_time_s": self.train_time_s, "eval_time_s": self.eval_time_s,
                "time_per_epoch_s": self.time_per_epoch_s, "switch_time_s": self.switch_time_s}

    def cache_metrics(self) -> dict[str, float]:
        """What the cache cost this run, spent and charged."""
        return {"cache_fill_time_s": self.filled_s,
                "cache_fill_charged_s": self.train_fill_s + self.val_fill_s + self.test_fill_s}


def trial_overhead(wall_s: float, training_s: float) -> float:
    """A trial's overhead: its wall time in the sweep (asked to recorded) less the
    :attr:`TrialTime.training_s` its job measured."""
    return max(wall_s - training_s, 0.0)


def overhead_per_trial(overheads: list[float], tested_s: float = 0.0) -> float:
    """``overhead_per_trial_s`` of a study: the trials' :func:`trial_overhead`, plus
    ``tested_s`` (the study's end-of-study test evaluation), per trial."""
    return (sum(overheads) + tested_s) / len(overheads) if overheads else 0.0
