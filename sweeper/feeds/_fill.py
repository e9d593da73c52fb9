"""Filling cache entries: a split's frozen-prefix outputs at a cut, computed once and shared.

An entry at cut ``k`` is derived from the deepest valid entry at a cut ``j < k`` of the same
split and weights, by running only units ``j..k-1``, so a whole study's frozen forward work
stays near one forward pass per image; the rows a fill passes on its way (at each cut between)
are entries too where computing them costs more than copying them out and they fit this
process's RAM budget beside what is there (small feature maps on a CPU, not a GPU's GBs at
224 px), so that a study's trials at those depths find them instead of computing them again (a
study visits its depths in an order that often goes from deep to shallow). Entries are found
in this process's RAM, then on disk under a file lock (one process fills an entry while the
others wait for it); a corrupt one is logged, deleted and rebuilt, never used. Each records its
fill cost (:func:`sweeper.timing.fill_cost`), which every trial using it is charged.

On a GPU, a fill whose rows the trial keeps on the device (within its ``device_room``) computes
them there and hands them to the trial at once; the entry is written from a copy on the
cache's background writer (:data:`sweeper.background.ENTRIES`), which holds the entry's lock
until the file is in place. At 224 px a GPU computes GBs of rows in a fraction of the time
the host takes to receive, checksum and write them (measured on an H200: 2 GB took 1.8 s to
copy into new host memory, 1.1 s to checksum and 2.1 s to write).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from torch import nn

from sweeper import timing
from sweeper.background import ENTRIES
from sweeper.device import as_input, autocast, download, gather, keep_on_device, layout, ready_event
from sweeper.errors import UserError
from sweeper.feeds import _entries as entries
from sweeper.feeds._feed import Feed, rows_prepare
from sweeper.feeds._keys import Prefix
from sweeper.feeds._memory import MEMORY

log = logging.getLogger("sweeper.feeds")

FILL_BATCH = 256
WAIT_SAY_S = 60  # how often a wait for an entry another trial or process fills says so


@torch.no_grad()
def _run_units(units: list[nn.Module], rows: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device, amp: bool, dtype: torch.dtype,
               out_device: torch.device | None = None) -> torch.Tensor:
    """``units`` applied to ``prepare(rows)`` in batches on ``device``, gathered on
    ``out_device`` (default: the CPU) as ``dtype`` (cast on the device: fewer bytes cross to
    the host)."""
    return _run_each(units, rows, prepare, device, amp, dtype, out_device)[0][-1][1]


@torch.no_grad()
def _run_each(units: list[nn.Module], rows: torch.Tensor,
              prepare: Callable[[torch.Tensor], torch.Tensor], device: torch.device, amp: bool,
              dtype: torch.dtype, out_device: torch.device | None = None,
              room: int | None = None,
              last_device: Callable[[int], torch.device | None] | None = None,
              ) -> tuple[list[tuple[int, torch.Tensor]], list[float]]:
    """Rows as ``(unit index, rows)`` pairs, shallowest first: the last unit's (those of
    :func:`_run_units`) and, with ``room``, also those after earlier units that are worth
    keeping; and the seconds each took to compute from ``rows`` (timed unit by unit and summed
    along the way; without ``room`` the times are not waited for on a GPU, and mean nothing).
    ``last_device``, given the last unit's rows' size in bytes, says where they go (None: the
    CPU) instead of ``out_device``; rows kept off the host keep no others (their copy-out
    rate was not measured).

    The rows after an earlier unit are kept (:func:`worth_keeping`) where computing them
    costs more than copying them out, as measured on the first batch, and where they fit in
    ``room`` bytes beside the last unit's rows, deepest first: at 32 px they are a few MB and
    save later trials a forward pass; a ResNet-50's at 224 px are GBs a GPU recomputes faster
    than it copies them to the host.
    """
    assert not any(u.training for u in units), "frozen units must be in eval mode"
    timed = room is not None
    clock = device if timed else None  # no GPU sync per batch where no one reads the times
    steps = len(units) or 1  # no unit: the prepared rows
    last = steps - 1
    if timed and device.type == "cuda" and len(rows):  # cuDNN picks its kernels: not timed
        with autocast(device, amp):
            x = prepare(gather(rows, slice(0, FILL_BATCH), device))
            for unit in units:
                x = unit(layout(x, training=False))
    only_last = [k == last for k in range(steps)]
    keep: list[bool] | None = None if timed else only_last
    outs: list[torch.Tensor | None] = [None] * steps
    ran, kept = [0.0] * steps, [0.0] * steps  # each unit's time, each output's copy

    def copy(k: int, x: torch.Tensor, start: int) -> None:
        with timing.measure(clock) as t:
            if outs[k] is None:
                where = out_device
                if k == last and last_device is not None:
                    where = last_device(len(rows) * x[0].numel() * dtype.itemsize)
                outs[k] = torch.empty((len(rows), *x.shape[1:]), dtype=dtype, device=where or "cpu")
            outs[k][start:start + len(x)].copy_(x.to(dtype))
        kept[k] += t.s

    for start in range(0, len(rows), FILL_BATCH):
        with timing.measure(clock) as t:
            x = gather(rows, slice(start, start + FILL_BATCH), device)
        ran[0] += t.s
        held = []  # the first batch's rows after each unit, until it is decided which to keep
        for k in range(steps):
            with timing.measure(clock) as t, autocast(device, amp):
                x = prepare(x) if k == 0 else x
                x = units[k](layout(x, training=False)) if units else x  # as forward_frozen
            ran[k] += t.s
            if keep is None:
                held.append(x)
            elif keep[k]:
                copy(k, x, start)
        if keep is None:
            copy(last, held[last], start)
            keep = (worth_keeping(held, ran, kept[last], len(rows), dtype, room)
                    if outs[last].device.type == "cpu" else only_last)
            for k in range(last):
                if keep[k]:
                    copy(k, held[k], start)
            del held
    # the rows at a cut cost the units up to it and their own copy, not the others'
    spent = [r + c for r, c in zip(itertools.accumulate(ran), kept, strict=True)]
    return ([(k, o) for k, o in enumerate(outs) if o is not None],
            [s for o, s in zip(outs, spent, strict=True) if o is not None])


def worth_keeping(batch: list[torch.Tensor], ran: list[float], copy_s: float, n_rows: int,
                   dtype: torch.dtype, room: int) -> list[bool]:
    """Which units' rows a fill keeps, decided on its first ``batch`` (the rows after each
    unit), ``ran`` (each unit's seconds on it) and ``copy_s`` (the seconds the last unit's rows
    took to copy out): the last always; an earlier one where computing it from the images took
    longer than copying it out would (at the last one's rate), while all of them fit in
    ``room`` bytes beside the last, deepest first."""
    size = dtype.itemsize
    last = len(batch) - 1
    per_s = batch[last].numel() * size / copy_s if copy_s > 0 else float("inf")
    room -= n_rows * batch[last][0].numel() * size
    keep = [False] * last + [True]
    computed = list(itertools.accumulate(ran))
    for k in range(last - 1, -1, -1):
        nbytes = n_rows * batch[k][0].numel() * size
        if computed[k] > batch[k].numel() * size / per_s and nbytes <= room:
            keep[k], room = True, room - nbytes
    return keep


def run_rows(feed: Feed, device: torch.device, amp: bool, dtype: torch.dtype,
             out_device: torch.device) -> torch.Tensor:
    """``feed.prepare`` over all of ``feed``'s rows, in batches on ``device``: its rows carried
    through the units frozen since they were computed, as ``dtype`` on ``out_device``."""
    return _run_units([], feed.rows, feed.prepare, device, amp, dtype, out_device)


def _find_parent(prefix: Prefix, cut: int, directory: Path) -> tuple[int, torch.Tensor, dict] | None:
    """The deepest valid entry of ``prefix`` at a cut below ``cut`` (RAM first, then disk)."""
    for j in range(cut - 1, 0, -1):
        key = prefix.key(j)
        if (hit := MEMORY.get(key)) is not None:
            return j, *hit
        path = directory / f"{key}.feat"
        if path.exists():
            try:
                return j, *entries.read(path, key, in_memory=False)
            except (entries.CorruptEntry, OSError) as e:
                log.warning("Not deriving from cache entry %s: %s", path, e)
    return None


def _fill(prefix: Prefix, cut: int, directory: Path,
          device_room: int = 0) -> list[tuple[int, torch.Tensor, dict]]:
    """Compute a split's prefix outputs at ``cut``, from a shallower entry where there is one;
    with them, the rows at each cut passed on the way (shallowest first, ``cut``'s last).
    ``cut``'s rows are computed on the GPU and left there where they and the labels fit
    ``device_room`` bytes (:func:`sweeper.device.keep_on_device`), else on the CPU."""
    model, device, normalize = prefix.model, prefix.device, prefix.normalize

    def images(x: torch.Tensor) -> torch.Tensor:
        return as_input(normalize(x))

    parent = _find_parent(prefix, cut, directory)
    j, rows, prepare, parent_cost, how = (0, prefix.split.images, images, 0.0, "filled")
    if parent is not None:
        j, rows, parent_meta = parent
        prepare, parent_cost, how = as_input, parent_meta["fill_time_s"], f"derived from cut {j}"
    room = max(0, MEMORY.budget - MEMORY.nbytes)  # RAM for the rows passed on the way
    labels = prefix.split.labels
    label_bytes = labels.numel() * labels.element_size()

    def last_device(nbytes: int) -> torch.device | None:
        return device if keep_on_device(nbytes + label_bytes, device, device_room) else None

    outs, spent = _run_each(list(model.units[j:cut]), rows, prepare, device, prefix.amp,
                            prefix.dtype, room=room, last_device=last_device)
    return [(j + k + 1, out, {"fill_time_s": timing.fill_cost(s, parent_cost), "spent_s": s,
                              "cut": j + k + 1, "how": how})
            for (k, out), s in zip(outs, spent, strict=True)]


def prefix_outputs(prefix: Prefix, cut: int, directory: Path,
                   device_room: int = 0) -> tuple[Feed, float]:
    """The split's prefix outputs at ``cut`` as a cached :class:`Feed`, and the time spent filling.

    Looks in this process's RAM, then on disk under a file lock (so that one process fills
    an entry while the others wait for it), and fills the entry only when neither has it.
    A fill whose rows fit ``device_room`` bytes on the GPU leaves them there, in the feed, and
    its entry is written in the background (see the module's doc).
    """
    key = prefix.key(cut)
    labels = prefix.split.labels
    if (hit := MEMORY.get(key)) is not None:
        rows, meta = hit
        return Feed(rows, labels, rows_prepare(prefix.model, cut), "hit (memory)",
                    meta["fill_time_s"], meta["nbytes"], cut=cut), 0.0
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.feat"
    rows, how, spent, mapped = None, "hit (disk)", 0.0, False
    # Not thread-local: a fill that leaves its rows on the GPU hands the lock to the writer.
    lock = FileLock(str(path.with_suffix(".lock")), thread_local=False)
    with _held(lock, path):
        if path.exists():
            try:
                mapped = entries.read_header(path, key)["nbytes"] > MEMORY.budget
                rows, meta = entries.read(path, key, in_memory=not mapped)
            except (entries.CorruptEntry, OSError) as e:
                log.warning("Rebuilding corrupt or stale cache entry %s: %s", path, e)
                path.unlink(missing_ok=True)
                rows, mapped = None, False
        if rows is None:
            *passed, (_, rows, meta) = _fill(prefix, cut, directory, device_room)
            how, spent = meta["how"], meta["spent_s"]
            if rows.device.type != "cpu":
                # The trial trains on these rows now; the writer writes their entry and then
                # lets the lock go (a process or trial that wants the entry waits for it).
                lock.acquire()  # held once more, for the writer to release
                ready = ready_event(rows.device)
                # (such a fill keeps no passed cut: _run_each)
                ENTRIES.submit(lambda: _write_later(directory, lock, key, rows, meta, ready))
                return Feed(rows, labels.to(rows.device), rows_prepare(prefix.model, cut), how,
                            meta["fill_time_s"], rows.numel() * rows.element_size(),
                            cut=cut), spent
            meta = entries.write(path, key, rows, meta)
            _write_passed(prefix, directory, passed)
    if not mapped and not MEMORY.put(key, rows, meta):
        rows, meta = entries.read(path, key, in_memory=False)  # over the budget: serve it from the file
        mapped = True
    return Feed(rows, labels, rows_prepare(prefix.model, cut), how, meta["fill_time_s"],
                meta["nbytes"], mapped, cut), spent


@contextmanager
def _held(lock: FileLock, path: Path) -> Iterator[None]:
    """``lock``, waited for as long as it takes (saying so every minute), then released.
    Each wait is bounded: filelock 3.x takes an unbounded wait in a thread whose earlier lock
    on the same file another thread released (the writer behind a GPU fill) for a deadlock
    and raises, where the lock is in fact free."""
    while True:
        try:
            lock.acquire(timeout=WAIT_SAY_S)
            break
        except Timeout:
            log.info("Feature cache: waiting for %s, which another trial or process is filling", path)
    try:
        yield
    finally:
        lock.release()


def _write_passed(prefix: Prefix, directory: Path, passed: list[tuple[int, torch.Tensor, dict]]
                  ) -> None:
    """The rows a fill kept at the cuts it passed, as entries too (in RAM where they fit)."""
    for at, at_rows, at_meta in passed:
        at_key = prefix.key(at)
        at_path = directory / f"{at_key}.feat"
        if not at_path.exists():  # (written atomically: another filler's is the same)
            MEMORY.put(at_key, at_rows, entries.write(at_path, at_key, at_rows, at_meta),
                       spare=True)


def _write_later(directory: Path, lock: FileLock, key: str, rows: torch.Tensor, meta: dict,
                 ready: torch.cuda.Event | None) -> None:
    """The background half of a fill that left its rows on the GPU: the entry written from a
    host copy (kept in RAM where it fits beside what is there), then ``lock`` released. A
    write that fails costs only the entry (the trial has its rows): it is logged."""
    try:
        host = download(rows, ready)
        path = directory / f"{key}.feat"
        MEMORY.put(key, host, entries.write(path, key, host, meta), spare=True)
    except (UserError, OSError, RuntimeError) as e:
        log.warning("Feature cache: the entry %s was not written (%s); the trial that filled "
                    "it goes on, and the next one to need it fills it again", key, e)
    finally:
        lock.release()
