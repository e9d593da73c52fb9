"""What the training loop consumes for one split: a :class:`Feed`, cached rows or images.

``prepare(rows[idx])`` is ``FreezeNet.forward_trainable``'s input: the rows are the input of
unit ``cut`` (cached frozen-prefix outputs there, or uint8 images at cut 0), and ``prepare``
runs them through whatever frozen units lie between ``cut`` and the model's cut (none, unless
a freeze strategy has moved the cut since: :mod:`sweeper.feeds._feeds`), after normalisation
and augmentation for images. Where the rows live during a trial, and how a batch reaches the
training device, is :mod:`sweeper.device`'s decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from sweeper.data import Augment, Normalize, Split
from sweeper.device import as_input, gather, keep_on_device, upload
from sweeper.model import FreezeNet


@dataclass
class Feed:
    """One split as the loop consumes it: ``prepare(rows[idx])`` is ``forward_trainable``'s input.

    ``rows`` are the inputs of unit ``cut``: cached prefix outputs (``prepare`` casts them to
    float and runs any frozen units from ``cut`` on) or uint8 images at cut 0 (``prepare``
    normalises, augments and runs the frozen prefix).
    """

    rows: torch.Tensor
    labels: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor]
    source: str  # how the rows came to be: "images ...", "hit ...", "filled", "derived ...", "run ..."
    fill_time_s: float = 0.0  # recorded cost of computing cached rows from the images, charged
    nbytes: int = 0
    mapped: bool = False  # rows are memory-mapped from the entry's file
    cut: int = 0  # the rows are the input of this unit (0: images)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def cached(self) -> bool:
        return not self.source.startswith("images")

    def describe(self, cut: int) -> str:
        """Where a training step at the model's ``cut`` gets its inputs, in words (the log)."""
        if not self.cached:
            return "from the images" + (f", through {cut} frozen units every step" if cut else "")
        kept = "this run's cache" if self.source.startswith("run") else "the shared cache"
        newly = cut - self.cut
        return (f"from {kept} at cut {self.cut}"
                + (f", then through {newly} newly frozen unit{'s' * (newly > 1)} every step"
                   if newly > 0 else ""))

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


def rows_prepare(model: FreezeNet, cut: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``prepare`` of rows cached at ``cut``: as float input, through the units frozen since."""
    def prepare(x: torch.Tensor) -> torch.Tensor:
        return model.forward_frozen(as_input(x), start=cut)
    return prepare
