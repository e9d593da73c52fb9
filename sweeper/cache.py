"""The frozen-prefix cache: what the training loop feeds the trainable suffix, computed once.

A frozen prefix (eval mode, no autograd; :mod:`sweeper.freeze`) is a fixed function of its
input, so for a deterministic input transform its output for each image never changes. This
module computes that output once per (backbone weights up to the cut, data split contents,
input normalisation, storage dtype, device, cut point), stores it, and hands the training loop a
:class:`Feed` of cached rows for ``FreezeNet.forward_trainable``; without a cache the feed holds
the uint8 images and runs them through normalisation, augmentation and the frozen prefix each
step. Caching never changes what is learnt: frozen BatchNorm layers use their running
statistics either way.

Entries
    Every entry is a file ``<cache.dir>/<key>.feat``: a 4 KiB JSON header (key, dtype, shape,
    size, blake2b checksum, measured fill time) and the raw tensor. Files are written under a
    file lock and renamed into place atomically, so processes on one machine share them and
    two processes filling the same entry compute it once. A file whose header, size or
    checksum is wrong is logged, deleted and rebuilt, never used. In each process, entries
    are kept in RAM up to ``cache.memory_budget_mb`` (least recently used leave first);
    beyond that they are memory-mapped from their file.

Deeper cuts
    An entry at cut ``k`` is derived from the deepest valid entry at a cut ``j < k`` of the
    same split and weights, by running only units ``j..k-1``; so a whole study's frozen
    forward work stays near one forward pass per image.

Fair time
    Each entry records the measured time of computing it from the images (a derived entry:
    its parent's recorded time plus the derivation). A trial is charged that recorded time
    for every entry it uses, whether it filled the entry or found it, so ``train_time_s``
    does not depend on which trials ran before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig
from torch import nn

from sweeper import timing
from sweeper.data import Augment, Data, Normalize, Split
from sweeper.errors import UserError
from sweeper.freeze import FreezeNet

log = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"SWEEPER-FEATURES\n"
HEADER_BYTES = 4096  # data starts page-aligned, ready for a memory map
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FILL_BATCH = 256
MODES = ("auto", "on", "off")


# --- what the training loop consumes ------------------------------------------------------

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

    def on(self, device: torch.device) -> Feed:
        """This feed with its rows on ``device`` when it is a GPU and they are in RAM (small
        sets: no copy per step); memory-mapped rows stay put and are copied per batch."""
        if device.type != "cuda" or self.mapped:
            return self
        return replace(self, rows=self.rows.to(device), labels=self.labels.to(device))

    def batch(self, idx: torch.Tensor | slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and labels at ``idx`` on ``device`` (pinned, non-blocking copies from the CPU)."""
        x, y = self.rows[idx], self.labels[idx]
        if x.device != device:
            if device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x, y

    def batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size), device)


@dataclass
class Feeds:
    train: Feed
    val: Feed
    test: Feed
    filled_s: float = 0.0  # time this trial actually spent filling entries

    def time(self) -> timing.TrialTime:
        """A trial's time, charged the recorded fill costs of these feeds' entries."""
        return timing.TrialTime(train_fill_s=self.train.fill_time_s,
                                val_fill_s=self.val.fill_time_s,
                                test_fill_s=self.test.fill_time_s, filled_s=self.filled_s)

    def tags(self) -> dict[str, str]:
        return {"cache.train": self.train.source, "cache.val": self.val.source,
                "cache.test": self.test.source}

    def metrics(self) -> dict[str, float]:
        """What the cache holds for this trial (its time metrics: :meth:`time`)."""
        feeds = (self.train, self.val, self.test)
        return {
            "cache_hits": sum(f.source.startswith("hit") for f in feeds),
            "cache_entries": sum(f.cached for f in feeds),
            "cache_bytes": sum(f.nbytes for f in feeds),
            "cache_mapped_bytes": sum(f.nbytes for f in feeds if f.mapped),
            "cache_memory_bytes": MEMORY.nbytes,
        }


def _image_prepare(model: FreezeNet, normalize: Normalize, augment: Augment | None,
                   device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    def prepare(x: torch.Tensor) -> torch.Tensor:
        if augment is not None:
            x = augment(x)
        x = normalize(x)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return model.forward_frozen(x)
    return prepare


def image_feed(model: FreezeNet, split: Split, normalize: Normalize, device: torch.device,
               augment: Augment | None = None, why: str = "") -> Feed:
    """A split fed as images: every step runs normalisation, ``augment`` and the frozen prefix."""
    source = f"images ({why})" if why else "images"
    return Feed(split.images, split.labels, _image_prepare(model, normalize, augment, device), source)


def _as_float(h: torch.Tensor) -> torch.Tensor:
    return h.float()


# --- keys ---------------------------------------------------------------------------------

def _hash() -> Any:
    return hashlib.blake2b(digest_size=16)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def unit_digest(unit: nn.Module) -> str:
    """Hash of a unit's architecture and every parameter and buffer value."""
    h = _hash()
    h.update(repr(unit).encode())
    for name, t in unit.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def split_digest(split: Split, normalize: Normalize) -> str:
    """Hash of a split's image contents (in order) and of the normalisation applied to them."""
    h = _hash()
    h.update(f"{split.images.dtype}:{tuple(split.images.shape)}".encode())
    h.update(_tensor_bytes(split.images))
    h.update(_tensor_bytes(normalize.mean))
    h.update(_tensor_bytes(normalize.std))
    return h.hexdigest()


@dataclass
class Prefix:
    """What determines a split's prefix outputs at every cut: one key per cut."""

    model: FreezeNet
    split: Split
    normalize: Normalize
    dtype: torch.dtype
    device: torch.device
    amp: bool
    data: str  # split_digest
    units: list[str]  # unit_digest of each frozen unit

    def key(self, cut: int) -> str:
        h = _hash()
        h.update(json.dumps({"format": FORMAT, "data": self.data, "dtype": str(self.dtype),
                             "device": self.device.type, "amp": self.amp,
                             "units": self.units[:cut]}).encode())
        return h.hexdigest()


# --- the process's RAM tier ---------------------------------------------------------------

class _Memory:
    """Entries held in this process's RAM, least recently used first, within a byte budget.

    Entries the current trial uses are never evicted for another one (that would keep both
    alive): a new entry that does not fit beside them is memory-mapped instead.
    """

    def __init__(self) -> None:
        self.entries: OrderedDict[str, tuple[torch.Tensor, dict]] = OrderedDict()
        self.in_use: set[str] = set()
        self.budget = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t, _ in self.entries.values())

    def start_trial(self, budget: int) -> None:
        self.budget = budget
        self.in_use.clear()

    def get(self, key: str) -> tuple[torch.Tensor, dict] | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            self.in_use.add(key)
            return self.entries[key]
        return None

    def put(self, key: str, rows: torch.Tensor, meta: dict) -> bool:
        """Keep ``rows`` if they fit the budget (evicting older entries); False if they do not."""
        size = rows.numel() * rows.element_size()
        for old in [k for k in self.entries if k not in self.in_use]:  # least recent first
            if self.nbytes + size <= self.budget:
                break
            del self.entries[old]
        if self.nbytes + size > self.budget:
            return False
        self.entries[key] = (rows, meta)
        self.in_use.add(key)
        return True

    def clear(self) -> None:
        self.entries.clear()
        self.in_use.clear()


MEMORY = _Memory()


# --- entry files --------------------------------------------------------------------------

class CorruptEntry(Exception):
    pass


def _checksum(data: torch.Tensor) -> str:
    h = _hash()
    h.update(_tensor_bytes(data))
    return h.hexdigest()


def _write(path: Path, key: str, rows: torch.Tensor, meta: dict) -> dict:
    meta = {**meta, "format": FORMAT, "key": key, "dtype": str(rows.dtype).removeprefix("torch."),
            "shape": list(rows.shape), "nbytes": rows.numel() * rows.element_size(),
            "checksum": _checksum(rows)}
    header = MAGIC + json.dumps(meta).encode()
    assert len(header) < HEADER_BYTES, "entry header too long"
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b" "))
        f.write(_tensor_bytes(rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the whole entry or none
    return meta


def _read_header(path: Path, key: str) -> dict:
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        raise CorruptEntry("no valid header")
    try:
        meta = json.loads(head[len(MAGIC):].decode())
    except ValueError as e:
        raise CorruptEntry(f"unreadable header ({e})") from None
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise CorruptEntry("header of another format or key")
    size = path.stat().st_size
    if size != HEADER_BYTES + meta["nbytes"]:
        raise CorruptEntry(f"size {size} B, header says {HEADER_BYTES + meta['nbytes']} B")
    return meta


def _read(path: Path, key: str, in_memory: bool) -> tuple[torch.Tensor, dict]:
    """An entry's rows, read into RAM or memory-mapped; raises :class:`CorruptEntry`."""
    meta = _read_header(path, key)
    if in_memory:
        raw = torch.from_file(str(path), shared=False, size=HEADER_BYTES + meta["nbytes"],
                              dtype=torch.uint8)[HEADER_BYTES:]
    else:  # copy-on-write map: pages come from the file, nothing is written back
        raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=HEADER_BYTES,
                                         shape=(meta["nbytes"],)))
    rows = raw.view(DTYPES[meta["dtype"]]).view(meta["shape"])
    if _checksum(rows) != meta["checksum"]:
        raise CorruptEntry("checksum mismatch")
    return rows, meta


# --- filling ------------------------------------------------------------------------------

@torch.no_grad()
def _run_units(units: list[nn.Module], rows: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device, amp: bool, dtype: torch.dtype) -> torch.Tensor:
    """``units`` applied to ``prepare(rows)`` in batches, gathered on the CPU as ``dtype``."""
    assert not any(u.training for u in units), "frozen units must be in eval mode"
    out = None
    for start in range(0, len(rows), FILL_BATCH):
        x = rows[start:start + FILL_BATCH].to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            x = prepare(x)
            for unit in units:
                x = unit(x)
        if out is None:
            out = torch.empty((len(rows), *x.shape[1:]), dtype=dtype)
        out[start:start + len(x)] = x.to("cpu", dtype)
    return out


def _find_parent(prefix: Prefix, cut: int, directory: Path) -> tuple[int, torch.Tensor, dict] | None:
    """The deepest valid entry of ``prefix`` at a cut below ``cut`` (RAM first, then disk)."""
    for j in range(cut - 1, 0, -1):
        key = prefix.key(j)
        if (hit := MEMORY.get(key)) is not None:
            return j, *hit
        path = directory / f"{key}.feat"
        if path.exists():
            try:
                return j, *_read(path, key, in_memory=False)
            except (CorruptEntry, OSError) as e:
                log.warning("Not deriving from cache entry %s: %s", path, e)
    return None


def _fill(prefix: Prefix, cut: int, directory: Path) -> tuple[torch.Tensor, dict]:
    """Compute a split's prefix outputs at ``cut``, from a shallower entry where there is one."""
    model, device, normalize = prefix.model, prefix.device, prefix.normalize

    def images(x: torch.Tensor) -> torch.Tensor:
        x = normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x

    parent = _find_parent(prefix, cut, directory)
    if parent is not None:
        j, parent_rows, parent_meta = parent
        with timing.measure(device) as spent:
            rows = _run_units(list(model.units[j:cut]), parent_rows, _as_float, device,
                              prefix.amp, prefix.dtype)
        return rows, {"fill_time_s": timing.fill_cost(spent.s, parent_meta["fill_time_s"]),
                      "spent_s": spent.s, "cut": cut, "how": f"derived from cut {j}"}
    with timing.measure(device) as spent:
        rows = _run_units(list(model.units[:cut]), prefix.split.images, images, device,
                          prefix.amp, prefix.dtype)
    return rows, {"fill_time_s": timing.fill_cost(spent.s), "spent_s": spent.s, "cut": cut,
                  "how": "filled"}


def prefix_outputs(prefix: Prefix, cut: int, directory: Path) -> tuple[Feed, float]:
    """The split's prefix outputs at ``cut`` as a cached :class:`Feed`, and the time spent filling.

    Looks in this process's RAM, then on disk under a file lock (so that one process fills
    an entry while the others wait for it), and fills the entry only when neither has it.
    """
    key = prefix.key(cut)
    labels = prefix.split.labels
    if (hit := MEMORY.get(key)) is not None:
        rows, meta = hit
        return Feed(rows, labels, _as_float, "hit (memory)", meta["fill_time_s"], meta["nbytes"]), 0.0
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.feat"
    rows, how, spent, mapped = None, "hit (disk)", 0.0, False
    with FileLock(str(path.with_suffix(".lock"))):
        if path.exists():
            try:
                mapped = _read_header(path, key)["nbytes"] > MEMORY.budget
                rows, meta = _read(path, key, in_memory=not mapped)
            except (CorruptEntry, OSError) as e:
                log.warning("Rebuilding corrupt or stale cache entry %s: %s", path, e)
                path.unlink(missing_ok=True)
                rows, mapped = None, False
        if rows is None:
            rows, meta = _fill(prefix, cut, directory)
            how, spent = meta["how"], meta["spent_s"]
            meta = _write(path, key, rows, meta)
    if not mapped and not MEMORY.put(key, rows, meta):
        rows, meta = _read(path, key, in_memory=False)  # over the budget: serve it from the file
        mapped = True
    return Feed(rows, labels, _as_float, how, meta["fill_time_s"], meta["nbytes"], mapped), spent


# --- a trial's feeds ----------------------------------------------------------------------

def cache_mode(cache: DictConfig | None) -> str:
    """``cache.mode`` as one of auto/on/off (YAML reads a bare on/off as a boolean)."""
    mode = "off" if cache is None else cache.get("mode", "auto")  # configs from before the cache
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else str(mode)
    if mode not in MODES:
        raise UserError(f"cache.mode={mode}: use auto, on or off.")
    return mode


def feeds(model: FreezeNet, data: Data, cache: DictConfig | None, augment: Augment | None,
          device: torch.device, amp: bool = False) -> Feeds:
    """How a trial's train, val and test splits reach ``model.forward_trainable``.

    ``cache.mode=auto`` caches what is deterministic: val and test always, train unless
    ``augment`` is random (then train runs through the frozen prefix every step, and the
    reason is logged); ``on`` is the same but a random train transform is a config error;
    ``off`` never caches. Fills and hits are timed and described for the trial's run.
    """
    mode = cache_mode(cache)
    amp = amp and device.type == "cuda"  # bf16 autocast runs on CUDA only (sweeper.train)
    normalize = data.normalize.to(device)
    random_train = augment is not None and augment.random

    def images(split: Split, why: str, aug: Augment | None = None) -> Feed:
        return image_feed(model, split, normalize, device, aug, why)

    if mode == "on" and random_train:
        raise UserError(
            f"cache.mode=on, but the train transform is random ({augment.describe()}): the frozen "
            "prefix's train outputs change every epoch, so they cannot be cached. Use "
            "cache.mode=auto (caches val and test, runs train through the prefix) or augment=none."
        )
    if mode == "off" or model.cut == 0:
        why = "cache.mode=off" if mode == "off" else "nothing frozen"
        if model.cut == 0 and mode != "off":
            log.info("Feature cache: nothing to cache (no frozen unit)")
        aug = augment if random_train else None
        return Feeds(images(data.train, why, aug), images(data.val, why), images(data.test, why))

    MEMORY.start_trial(int(float(cache.memory_budget_mb) * 2**20))
    directory = Path(str(cache.dir))
    dtype = DTYPES.get(str(cache.dtype))
    if dtype is None:
        raise UserError(f"cache.dtype={cache.dtype}: use one of {', '.join(DTYPES)}.")
    units = [unit_digest(u) for u in model.frozen_units()]
    out: dict[str, Feed] = {}
    filled_s = 0.0
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if name == "train" and random_train:
            why = f"augment is random: {augment.describe()}"
            log.info("Feature cache (auto): train runs through the frozen prefix, %s", why)
            out[name] = images(split, why, augment)
            continue
        prefix = Prefix(model, split, normalize, dtype, device, amp,
                        split_digest(split, data.normalize), units)
        feed, spent = prefix_outputs(prefix, model.cut, directory)
        filled_s += spent
        log.info("Feature cache: %s at cut %d %s (%.1f MB%s, fill cost %.2fs)", name, model.cut,
                 feed.source, feed.nbytes / 2**20, ", memory-mapped" if feed.mapped else "",
                 feed.fill_time_s)
        out[name] = feed
    return Feeds(**out, filled_s=filled_s)
