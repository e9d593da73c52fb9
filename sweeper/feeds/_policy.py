"""What a trial caches (``cache.mode``, storage dtype, RAM budget), and why a split is not."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from sweeper.data import Augment, Data, Split
from sweeper.errors import UserError
from sweeper.feeds._entries import DTYPES
from sweeper.feeds._feed import Feed, Feeds, image_feed
from sweeper.feeds._fill import prefix_outputs
from sweeper.feeds._keys import Prefix, split_digest, unit_digest
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
              device: torch.device, amp: bool = False, test: bool = True) -> Feeds:
    """How a trial's train, val and test splits reach ``model.forward_trainable``.

    ``cache.mode=auto`` caches what is deterministic: val and test always, train unless
    ``augment`` is random (then train runs through the frozen prefix every step, and the
    reason is logged); ``on`` is the same but a random train transform is a config error;
    ``off`` never caches. Fills and hits are timed and described for the trial's run.
    ``cache.device_budget_mb`` caps the rows the trial keeps on a GPU (:meth:`Feed.on`).
    ``test=False`` leaves the test split out (``Feeds.test`` is None): nothing is filled for it.
    """
    names = ("train", "val", "test") if test else ("train", "val")
    out, filled_s, units = _feeds(model, data, cache, augment, device, amp, names)
    return Feeds(out["train"], out["val"], out.get("test"), filled_s=filled_s,
                 frozen_digests=units, device_budget_mb=_device_budget_mb(cache))


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
    """The test split alone, fed as :func:`for_trial` feeds it (for a test evaluation after the
    trial: a study's end)."""
    return _feeds(model, data, cache, None, device, amp, ("test",))[0]["test"]


def _feeds(model: FreezeNet, data: Data, cache: DictConfig | None, augment: Augment | None,
           device: torch.device, amp: bool, names: tuple[str, ...]
           ) -> tuple[dict[str, Feed], float, list[str] | None]:
    """The feeds of splits ``names``, the time spent filling them, and the frozen units'
    digests when the cache computed them."""
    mode = cache_mode(cache)
    amp = amp and device.type == "cuda"  # bf16 autocast runs on CUDA only (sweeper.train)
    normalize = data.normalize.to(device)
    random_train = augment is not None and augment.random

    def images(split: Split, why: str, aug: Augment | None = None) -> Feed:
        return image_feed(model, split, normalize, aug, why)

    check_cache(cache, augment)
    if mode == "off" or model.cut == 0:
        why = "cache.mode=off" if mode == "off" else "nothing frozen"
        if model.cut == 0 and mode != "off":
            log.info("Feature cache: nothing to cache (no frozen unit)")
        aug = augment if random_train else None
        return ({name: images(getattr(data, name), why, aug if name == "train" else None)
                 for name in names}, 0.0, [] if model.cut == 0 else None)

    MEMORY.start_trial(int(float(cache.memory_budget_mb) * 2**20))
    directory = Path(str(cache.dir))
    dtype = DTYPES.get(str(cache.dtype))
    if dtype is None:
        raise UserError(f"cache.dtype={cache.dtype}: use one of {', '.join(DTYPES)}.")
    units = [unit_digest(u) for u in model.frozen_units()]
    out: dict[str, Feed] = {}
    filled_s = 0.0
    for name in names:
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
    return out, filled_s, units
