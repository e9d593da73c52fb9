"""What a trial caches (``cache.mode``, storage dtype, RAM budget), and why a split is not."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from sweeper.data import Augment, Data
from sweeper.device import keep_on_device, rows_budget
from sweeper.errors import UserError
from sweeper.feeds._entries import DTYPES
from sweeper.feeds._feed import Feed
from sweeper.feeds._feeds import SPLITS, Feeds, Source
from sweeper.feeds._memory import MEMORY
from sweeper.model import FreezeNet

log = logging.getLogger("sweeper.feeds")

MODES = ("auto", "on", "off")


def cache_mode(cache: DictConfig | None) -> str:
    """``cache.mode`` as one of auto/on/off (YAML reads a bare on/off as a boolean)."""
    mode = "off" if cache is None else cache.get("mode", "auto")  # configs from before the cache
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else str(mode)
    if mode not in MODES:
        raise UserError(f"cache.mode={mode}: use auto, on or off.")
    return mode


def check_cache(cache: DictConfig | None, augment: Augment | None) -> str:
    """``cache.mode``, refused with ``cache.mode=on`` and a random train transform (the frozen
    prefix's train outputs would change every epoch)."""
    mode = cache_mode(cache)
    if mode == "on" and augment is not None and augment.random:
        raise UserError(
            f"cache.mode=on, but the train transform is random ({augment.describe()}): the frozen "
            "prefix's train outputs change every epoch, so they cannot be cached. Use "
            "cache.mode=auto (caches val and test, runs train through the prefix) or augment=none."
        )
    return mode


def for_trial(model: FreezeNet, data: Data, cache: DictConfig | None, augment: Augment | None,
              device: torch.device, amp: bool = False, test: bool = True,
              test_cut: int | None = None) -> Feeds:
    """How a trial's train, val and test splits reach ``model.forward_trainable``.

    ``cache.mode=auto`` caches what is deterministic: val always, test when the rows are
    stored in float32 (else test runs through the model as the exported model does: rounded
    rows would change ``test_acc``), train unless ``augment`` is random (then train runs
    through the frozen prefix every step, and the reason is logged); ``on`` is the same but
    a random train transform is a config error; ``off`` never caches. Fills and hits are
    timed and described for the trial's run.
    ``cache.device_budget_mb`` caps the rows the trial keeps on a GPU (:meth:`Feeds.place`).
    Train and val are fed at the model's cut, test at ``test_cut`` (default: the same), the
    lowest cut a freeze strategy reaches in the run; :meth:`Feeds.follow` moves train and val
    with the cut. ``test=False`` leaves the test split out (``Feeds.test`` is None): nothing
    is filled for it.
    """
    budget_mb = _device_budget_mb(cache)
    names = SPLITS if test else ("train", "val")
    source, out, filled_s = _feeds(model, data, cache, augment, device, amp, names, test_cut,
                                   rows_budget(device, budget_mb))
    # The digests of the units frozen at the start (a shared entry's key has them; the first
    # entry made is at the highest cut the run starts from).
    units = next(iter(source.prefixes.values())).units if source.prefixes else (
        [] if model.cut == 0 else None)
    return Feeds(out["train"], out["val"], out.get("test"), filled_s=filled_s,
                 device_budget_mb=budget_mb, frozen_digests=units, source=source,
                 lowest_cut=model.cut)


def _device_budget_mb(cache: DictConfig | None) -> float | None:
    """``cache.device_budget_mb``, checked: None (sweeper.device's rule) or MB >= 0."""
    budget_mb = None if cache is None else cache.get("device_budget_mb")
    if budget_mb is not None and (isinstance(budget_mb, bool) or not isinstance(budget_mb, int | float)
                                  or budget_mb < 0):
        raise UserError(f"cache.device_budget_mb={budget_mb}: use null (half the GPU memory free "
                        "to the trial) or a number of MB >= 0 (0 copies every batch).")
    return budget_mb


def test_feed(model: FreezeNet, data: Data, cache: DictConfig | None, device: torch.device,
              amp: bool = False) -> Feed:
    """The test split alone at the model's cut, fed as :func:`for_trial` feeds it (for a test
    evaluation after the trial: a study's end)."""
    return _feeds(model, data, cache, None, device, amp, ("test",), None)[1]["test"]


def _feeds(model: FreezeNet, data: Data, cache: DictConfig | None, augment: Augment | None,
           device: torch.device, amp: bool, names: tuple[str, ...], test_cut: int | None,
           device_room: int = 0) -> tuple[Source, dict[str, Feed], float]:
    """Where the splits' rows come from, the feeds of splits ``names``, and the time spent
    filling them. Train, then val, are filled on the GPU where they fit ``device_room``
    bytes, as :meth:`Feeds.place` would then copy them there."""
    mode = cache_mode(cache)
    amp = amp and device.type == "cuda"  # bf16 autocast runs on CUDA only (sweeper.train)
    random_train = augment is not None and augment.random
    check_cache(cache, augment)
    dtype = DTYPES.get(str(cache.dtype)) if cache is not None else torch.float32
    if dtype is None:
        raise UserError(f"cache.dtype={cache.dtype}: use one of {', '.join(DTYPES)}.")
    why_not = dict.fromkeys(SPLITS, "cache.mode=off" if mode == "off" else "")
    if dtype != torch.float32 and not why_not["test"]:
        # test_acc is the accuracy of the model a user gets (sweeper.export runs images in
        # float32): rows stored rounded would flip a borderline image now and then.
        why_not["test"] = f"test runs as the exported model does, not rounded to {cache.dtype}"
    if random_train and mode != "off" and "train" in names:
        why_not["train"] = f"augment is random: {augment.describe()}"
        log.info("Feature cache (auto): train runs through the frozen prefix, %s", why_not["train"])
    budget = 0 if cache is None else int(float(cache.memory_budget_mb) * 2**20)
    MEMORY.start_trial(budget)
    source = Source(model, {name: getattr(data, name) for name in SPLITS}, data.normalize.to(device),
                    augment if random_train else None, device, amp, dtype,
                    Path(str(cache.dir)) if cache is not None else Path(), budget, why_not)
    if model.cut == 0 and mode != "off":
        log.info("Feature cache: nothing to cache at the start (no frozen unit)")
    out: dict[str, Feed] = {}
    filled_s = 0.0
    for name in names:
        cut = model.cut if name != "test" or test_cut is None else test_cut
        out[name], spent = source.at(name, cut, device_room if name != "test" else 0)
        if name != "test" and keep_on_device(out[name].size_bytes, device, device_room):
            device_room -= out[name].size_bytes  # there already, or Feeds.place copies it there
        filled_s += spent
    return source, out, filled_s
