"""A trial's feeds over its whole run: train, val and test, and how they follow a moving cut.

A freeze strategy (:mod:`sweeper.schedule`) may move the model's cut mid-run; the feeds follow
it (:meth:`Feeds.follow`) so that the frozen units never run when their output is at hand:

- units **unfrozen** (gradual): they were frozen since the start, so everything below the new
  cut still has its pretrained weights and the split's rows there are a **shared** entry of
  the cache (keyed by those units' digests, found or filled as at the start of a trial, and
  charged its recorded cost);
- units **frozen after training** (progressive): their weights are this run's own, so their
  outputs are a **per-run** entry: computed once from the rows the split had, kept by this run
  only (in RAM within ``cache.memory_budget_mb``, or on the GPU), never written to the shared
  cache, and charged the time it took. It is made only when at least an epoch of training is
  left to use it, and when the split may be cached at all (a random train transform or
  ``cache.mode=off`` keep images); otherwise the split's rows stay as they were and the newly
  frozen units run forward, without autograd, in every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sweeper import timing
from sweeper.data import Augment, Normalize, Split
from sweeper.device import keep_on_device, rows_budget
from sweeper.feeds._feed import Feed, image_feed, rows_prepare
from sweeper.feeds._fill import prefix_outputs, run_rows
from sweeper.feeds._keys import Prefix, split_digest, unit_digest
from sweeper.feeds._memory import MEMORY
from sweeper.model import FreezeNet

log = logging.getLogger("sweeper.feeds")

SPLITS = ("train", "val", "test")


@dataclass
class Source:
    """Where a trial's split rows at any cut come from: the shared cache (``prefixes``, one
    per cacheable split, keyed by the digests of the units frozen at the start) or images."""

    model: FreezeNet
    splits: dict[str, Split]
    normalize: Normalize
    augment: Augment | None  # the train transform when it is random (then train is never cached)
    device: torch.device
    amp: bool
    dtype: torch.dtype
    directory: Path
    memory_budget: int  # bytes: the largest per-run entry kept in RAM
    why_not: dict[str, str]  # split -> why it is fed as images ("" when it may be cached)
    prefixes: dict[str, Prefix] = field(default_factory=dict)  # made at a split's first entry

    def at(self, name: str, cut: int, device_room: int = 0) -> tuple[Feed, float]:
        """The split's rows at ``cut``, whose units below it are as at the start: the shared
        entry there, or images when it is not cached. Returns the feed and the time spent
        filling shared entries. A fill whose rows fit ``device_room`` bytes on the GPU
        leaves them there (:func:`sweeper.feeds.prefix_outputs`)."""
        why = self.why_not[name] or ("nothing frozen" if cut == 0 else "")
        if why:
            return image_feed(self.model, self.splits[name], self.normalize,
                              self.augment if name == "train" else None, why), 0.0
        if name not in self.prefixes:  # the units below ``cut`` are as they were at the start
            split = self.splits[name]
            # the same units as another split's at this cut: their digests are the same
            units = next((p.units for p in self.prefixes.values() if len(p.units) == cut),
                         None) or [unit_digest(u) for u in self.model.units[:cut]]
            self.prefixes[name] = Prefix(self.model, split, self.normalize, self.dtype, self.device,
                                         self.amp, split_digest(split, self.normalize), units)
        feed, spent = prefix_outputs(self.prefixes[name], cut, self.directory, device_room)
        log.info("Feature cache: %s at cut %d %s (%.1f MB%s, fill cost %.2fs)", name, cut,
                 feed.source, feed.nbytes / 2**20, ", memory-mapped" if feed.mapped else "",
                 feed.fill_time_s)
        return feed, spent

    def derive(self, name: str, feed: Feed, cut: int, device_budget: int) -> Feed | None:
        """A per-run entry: ``feed``'s rows carried through the units frozen since, up to the
        model's cut ``cut``, kept on the GPU where they fit ``device_budget``, else in RAM
        within the memory budget; None when the split may not be cached or does not fit."""
        if self.why_not[name]:
            return None
        probe = run_rows(Feed(feed.rows[:1], feed.labels[:1], feed.prepare, feed.source),
                         self.device, self.amp, self.dtype, torch.device("cpu"))
        nbytes = probe.element_size() * probe.numel() * len(feed)
        if keep_on_device(nbytes, self.device, device_budget):
            out_device = self.device
        elif nbytes <= self.memory_budget:
            out_device = torch.device("cpu")
        else:
            log.info("Feature cache: %s at cut %d not kept (%.1f MB > cache.memory_budget_mb); "
                     "the newly frozen units run in every step", name, cut, nbytes / 2**20)
            return None
        rows = run_rows(feed, self.device, self.amp, self.dtype, out_device)
        return Feed(rows, feed.labels.to(out_device), rows_prepare(self.model, cut),
                    f"run (derived from cut {feed.cut})", nbytes=nbytes, cut=cut)


@dataclass
class Recut:
    """What following a new cut cost the feeds (composed by :class:`sweeper.timing.TrialTime`)."""

    train_s: float = 0.0  # all time spent on train's rows ...
    val_s: float = 0.0  # ... and on val's
    train_shared_s: float = 0.0  # of train_s: finding or filling shared entries (charged apart)
    val_shared_s: float = 0.0
    train_fill_s: float = 0.0  # recorded cost of the shared train entry now used (0: none)
    val_fill_s: float = 0.0
    filled_s: float = 0.0  # time spent filling shared entries


@dataclass
class Feeds:
    """A trial's train, val and test feeds (:func:`sweeper.feeds.for_trial`).

    The training loop reads ``train`` and ``val`` after :meth:`place` (rows on the GPU where
    they fit) and calls :meth:`follow` whenever the model's cut moves; ``test`` is fed at the
    lowest cut of the run, so that it is valid at the end whatever the strategy, or is None
    when the trial leaves its test evaluation to later (a study evaluates only the trials its
    report needs).
    """

    train: Feed
    val: Feed
    test: Feed | None
    filled_s: float = 0.0  # time this trial actually spent filling entries
    device_budget_mb: float | None = None  # cache.device_budget_mb: None = sweeper.device's rule
    frozen_digests: list[str] | None = None  # unit_digest of each unit frozen at the start
    source: Source | None = None  # None: every feed is images
    device: torch.device = torch.device("cpu")  # where place() put the rows
    budget: int = 0  # bytes of rows the trial may still place on the device
    lowest_cut: int | None = None  # units from here on may have trained in this run

    def _feeds(self) -> list[Feed]:
        return [f for f in (self.train, self.val, self.test) if f is not None]

    def time(self) -> timing.TrialTime:
        """A trial's time, charged the recorded fill costs of these feeds' entries."""
        return self.charge(timing.TrialTime())

    def charge(self, time: timing.TrialTime) -> timing.TrialTime:
        """``time`` charged the recorded fill costs of these feeds' entries (and returned)."""
        time.train_fill_s = self.train.fill_time_s
        time.val_fill_s = self.val.fill_time_s
        time.test_fill_s = self.test.fill_time_s if self.test is not None else 0.0
        time.filled_s = self.filled_s
        return time

    def tags(self) -> dict[str, str]:
        return {f"cache.{name}": feed.source for name, feed in
                (("train", self.train), ("val", self.val), ("test", self.test))
                if feed is not None}

    def metrics(self) -> dict[str, float]:
        """What the cache holds for this trial (its time metrics: :meth:`time`)."""
        feeds = self._feeds()
        return {
            "cache_hits": sum(f.source.startswith("hit") for f in feeds),
            "cache_entries": sum(f.cached for f in feeds),
            "cache_bytes": sum(f.nbytes for f in feeds),
            "cache_mapped_bytes": sum(f.nbytes for f in feeds if f.mapped),
            "cache_memory_bytes": MEMORY.nbytes,
        }

    def place(self, device: torch.device, cut: int) -> tuple[float, float]:
        """Copy the train rows, then the val rows, to ``device`` once for the trial where they
        fit its budget (:func:`sweeper.device.rows_budget`; none on the CPU), which rows a fill
        left there already count against; ``cut`` is the model's at the start (the units below
        it are as pretrained). Returns the seconds each copy took."""
        self.device = device
        self.lowest_cut = cut if self.lowest_cut is None else min(cut, self.lowest_cut)
        placed = sum(f.size_bytes for f in (self.train, self.val) if f.rows.device.type != "cpu")
        self.budget = rows_budget(device, self.device_budget_mb, placed) - placed
        times = []
        for name in ("train", "val"):
            with timing.measure(device) as copy:
                self._put(name, getattr(self, name))
            times.append(copy.s)
        return times[0], times[1]

    def _put(self, name: str, feed: Feed) -> None:
        """``feed`` as the split's feed, on the device when it fits what is left of the budget
        (the split's previous rows there give their room back)."""
        old = getattr(self, name)
        if old.rows.device.type != "cpu":
            self.budget += old.size_bytes
        if feed.rows.device.type == "cpu":
            feed = feed.on(self.device, self.budget)
        if feed.rows.device.type != "cpu":
            self.budget -= feed.size_bytes
        setattr(self, name, feed)

    def follow(self, model: FreezeNet, worth_caching: bool) -> Recut:
        """Train and val rows at the model's new cut (see the module's doc); ``worth_caching``:
        enough of the run is left for a per-run entry to pay for itself."""
        recut = Recut()
        lowest = self.lowest_cut if self.lowest_cut is not None else model.num_units
        for name in ("train", "val"):
            with timing.measure(self.device) as spent:
                shared_s, fill_s, filled_s = self._follow(name, model.cut, lowest, worth_caching)
            if name == "train":
                recut.train_s, recut.train_shared_s, recut.train_fill_s = spent.s, shared_s, fill_s
            else:
                recut.val_s, recut.val_shared_s, recut.val_fill_s = spent.s, shared_s, fill_s
            recut.filled_s += filled_s
        self.lowest_cut = min(lowest, model.cut)
        return recut

    def _follow(self, name: str, cut: int, lowest: int, worth_caching: bool
                ) -> tuple[float, float, float]:
        """Move split ``name`` to ``cut``, given that units from ``lowest`` on have trained in
        this run: (seconds on shared entries, recorded cost of the shared entry now used,
        seconds spent filling shared entries)."""
        feed = getattr(self, name)
        if feed.cut == cut:
            return 0.0, 0.0, 0.0
        shared_s = fill_s = filled_s = 0.0
        base = feed  # units frozen on top of the split's rows: carry the rows on from there
        if feed.cut > cut:
            # Units unfrozen: the rows must start lower. Below the lowest unit this run has
            # trained the units are as pretrained: the shared cache has them (or images).
            assert self.source is not None, "cached rows come with their source"
            room = self.budget + (feed.size_bytes if feed.rows.device.type != "cpu" else 0)
            with timing.measure(self.device) as got:
                base, filled_s = self.source.at(name, min(cut, lowest), room)
            shared_s, fill_s = got.s, base.fill_time_s
        if base.cut < cut and worth_caching and self.source is not None:
            # Units base.cut..cut-1 are frozen now, and this run trained them: a per-run entry.
            room = self.budget + (feed.size_bytes if feed.rows.device.type != "cpu" else 0)
            derived = self.source.derive(name, base, cut, room)
            if derived is not None:
                log.info("Feature cache: %s at cut %d computed for this run (%.1f MB)", name,
                         cut, derived.nbytes / 2**20)
                base = derived
        self._put(name, base)
        return shared_s, fill_s, filled_s
