"""How the training loop is fed: each split as a :class:`Feed`, from the frozen-prefix cache.

A frozen prefix (eval mode, no autograd; :class:`sweeper.model.FreezeNet`) is a fixed function
of its input, so for a deterministic input transform its output for each image never changes.
The cache computes that output once per (backbone weights up to the cut, data split contents,
input normalisation, storage dtype, device, cut point), stores it, and hands the training loop
a :class:`Feed` of cached rows for ``FreezeNet.forward_trainable``; without a cache the feed
holds the uint8 images and runs them through normalisation, augmentation and the frozen prefix
each step. Caching never changes what is learnt: frozen BatchNorm layers use their running
statistics either way.

- :func:`for_trial`: a trial's train, val and test feeds, by ``cache.mode`` (``_policy``;
  ``CACHE_MODES`` and ``CACHE_DTYPES`` are the values ``cache.mode`` and ``cache.dtype`` take);
  :func:`test_feed`: the test split alone, for an evaluation after the trial;
- :func:`prefix_outputs`: one split's outputs at a cut, found or filled (``_fill``: derived
  from the deepest shallower entry where there is one); :func:`worth_keeping`: which rows a
  fill passes on its way it keeps too;
- :class:`Prefix`, :func:`unit_digest`, :func:`split_digest`: what keys an entry (``_keys``);
- entry files ``<cache.dir>/<key>.feat``, checksummed and written atomically, shared by the
  processes of a machine (``_entries``); ``MEMORY``: this process's RAM tier within
  ``cache.memory_budget_mb``, beyond which entries are memory-mapped (``_memory``).

Every entry records what it cost to compute from the images; a trial is charged that cost for
the entries it uses, found or filled (:mod:`sweeper.timing`), so ``train_time_s`` does not
depend on which trials ran before.
"""

from sweeper.feeds._entries import DTYPES as CACHE_DTYPES
from sweeper.feeds._feed import Feed, image_feed
from sweeper.feeds._feeds import Feeds, Recut
from sweeper.feeds._fill import prefix_outputs, worth_keeping
from sweeper.feeds._keys import Prefix, split_digest, unit_digest
from sweeper.feeds._memory import MEMORY
from sweeper.feeds._policy import MODES as CACHE_MODES
from sweeper.feeds._policy import check_cache, for_trial, test_feed

__all__ = ["CACHE_DTYPES", "CACHE_MODES", "MEMORY", "Feed", "Feeds", "Prefix", "Recut",
           "check_cache", "for_trial", "image_feed", "prefix_outputs", "split_digest",
           "test_feed", "unit_digest", "worth_keeping"]
