"""What the training loop consumes: a :class:`Feed` per split, cached rows or images.

``prepare(rows[idx])`` is ``FreezeNet.forward_trainable``'s input: cached frozen-prefix
outputs cast to float, or uint8 images run through normalisation, augmentation and the
frozen prefix every step. Where the rows live during a trial, and how a batch reaches the
training device, is :mod:`sweeper.device`'s decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from sweeper import timing
from sweeper.data import Augment, Normalize, Split
from sweeper.device import as_input, gather, keep_on_device, upload
from sweeper.feeds._memory import MEMORY
from sweeper.model import FreezeNet


@dataclass
class Feed:
    """One split as the loop consumes it: ``prepare(rows[idx])`` is ``forward_trainable``'s input.

    ``rows`` are cached prefix outputs (``prepare`` casts them to float) or uint8 images
    (``prepare`` normalises, augments and runs the frozen prefix).
    """

    rows: torch.Tensor
    labels: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor]
    source: str  # how the rows came to be: "images ...", "hit ...", "filled", "derived ..."
    fill_time_s: float = 0.0  # recorded cost of computing cached rows from the images, charged
    nbytes: int = 0
    mapped: bool = False  # rows are memory-mapped from the entry's file

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def cached(self) -> bool:
        return not self.source.startswith("images")

    @property
    def size_bytes(self) -> int:
        """Bytes of rows and labels, wherever they are."""
        return sum(t.numel() * t.element_size() for t in (self.rows, self.labels))

    def on(self, device: torch.device, budget: int) -> Feed:
        """This feed with rows and labels copied to ``device`` once, for a whole trial, when
        :func:`sweeper.device.keep_on_device` says so (a GPU, within ``budget`` bytes);
        otherwise itself, and its batches are copied one at a time."""
        if not keep_on_device(self.size_bytes, device, budget):
            return self
        return replace(self, rows=upload(self.rows, device), labels=upload(self.labels, device))

    def batch(self, idx: torch.Tensor | slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and labels at ``idx`` (on the rows' device) on ``device``
        (:func:`sweeper.device.gather`: pinned, non-blocking copies from the CPU to a GPU)."""
        return gather(self.rows, idx, device), gather(self.labels, idx, device)

    def batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size), device)


@dataclass
class Feeds:
    """A trial's splits as the loop consumes them; ``test`` is None when the trial leaves its
    test evaluation to later (a study evaluates only the trials its report needs)."""

    train: Feed
    val: Feed
    test: Feed | None
    filled_s: float = 0.0  # time this trial actually spent filling entries
    device_budget_mb: float | None = None  # cache.device_budget_mb: None = sweeper.device's rule
    frozen_digests: list[str] | None = None  # unit_digest of each frozen unit, when computed

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


def _image_prepare(model: FreezeNet, normalize: Normalize,
                   augment: Augment | None) -> Callable[[torch.Tensor], torch.Tensor]:
    def prepare(x: torch.Tensor) -> torch.Tensor:
        if augment is not None:
            x = augment(x)
        return model.forward_frozen(as_input(normalize(x)))
    return prepare


def image_feed(model: FreezeNet, split: Split, normalize: Normalize,
               augment: Augment | None = None, why: str = "") -> Feed:
    """A split fed as images: every step runs normalisation, ``augment`` and the frozen prefix
    on the batch's device."""
    source = f"images ({why})" if why else "images"
    return Feed(split.images, split.labels, _image_prepare(model, normalize, augment), source)
