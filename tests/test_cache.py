"""The frozen-prefix cache: same weights as training through the prefix, derived cuts, sharing
between processes, corrupt entries, augmentation rules and a time objective that does not
depend on a cold or warm cache."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sweeper import data as data_mod
from sweeper import feeds as cache
from sweeper.errors import UserError
from sweeper.model import build
from sweeper.train import fit
from sweeper.trial import build_model, run_trial

ROOT = Path(__file__).resolve().parent.parent


def _model(cfg, data, unfrozen: int):
    torch.manual_seed(0)
    model, _ = build(cfg.backbone, len(data.classes), unfrozen, None)
    return model


def _prefix(cfg, model, data, split: str = "train", dtype=torch.float32) -> cache.Prefix:
    s = getattr(data, split)
    return cache.Prefix(model, s, data.normalize, dtype, torch.device("cpu"), False,
                        cache.split_digest(s, data.normalize),
                        [cache.unit_digest(u) for u in model.frozen_units()])


def _trained(make_cfg, *overrides: str, feed: str, unfrozen: int = 3):
    """Weights after training with train/val fed as ``images``, ``cached`` or ``fp16-rounded``
    (images through the frozen prefix, its output rounded to fp16 and back)."""
    cfg = make_cfg("trainer.epochs=2", *overrides)
    data = data_mod.load(cfg.dataset)
    model = _model(cfg, data, unfrozen)
    cpu = torch.device("cpu")
    feeds = None
    if feed == "cached":
        feeds = cache.for_trial(model, data, cfg.cache, None, cpu)
        assert feeds.train.cached and feeds.val.cached
    elif feed == "fp16-rounded":
        feeds = cache.Feeds(*(cache.image_feed(model, s, data.normalize)
                              for s in (data.train, data.val, data.test)))
        for f in (feeds.train, feeds.val):
            f.prepare = lambda x, p=f.prepare: p(x).half().float()
    fit(model, data, cfg.trainer, cfg.optim, cpu, feeds=feeds)
    return model.state_dict(), feeds


CUSTOM = ("backbone=custom", "backbone.target=tests.nets.Tiny", "backbone.units=[stem,body]",
          "backbone.head=fc")


@pytest.mark.parametrize(("backbone", "unfrozen"), [((), 3), (CUSTOM, 1)],
                         ids=["resnet18", "custom"])
def test_cache_trains_the_same_weights_as_the_frozen_prefix_in_eval_mode(make_cfg, backbone,
                                                                          unfrozen):
    # fp32 storage: bit-identical to running the frozen prefix (eval mode) every step; for
    # the hand-cut families and for units cut from a traced forward alike.
    reference, _ = _trained(make_cfg, *backbone, feed="images", unfrozen=unfrozen)
    cached, feeds = _trained(make_cfg, *backbone, "cache.dtype=float32", feed="cached",
                             unfrozen=unfrozen)
    assert feeds.train.rows.dtype == torch.float32
    initial = _model(make_cfg(*backbone), data_mod.load(make_cfg().dataset), unfrozen).state_dict()
    assert any(not torch.equal(reference[k], initial[k]) for k in reference)  # it did train
    for name, want in reference.items():
        assert torch.equal(cached[name], want), name


def test_fp16_storage_changes_nothing_but_the_rounding_of_the_prefix_output(make_cfg):
    rounded, _ = _trained(make_cfg, feed="fp16-rounded")
    cached, feeds = _trained(make_cfg, "cache.dtype=float16", feed="cached")
    assert feeds.train.rows.dtype == torch.float16
    for name, want in rounded.items():
        assert torch.equal(cached[name], want), name
    # And that rounding moves a linear probe's weights by fp16-sized amounts. (Deeper suffixes
    # with train-mode BatchNorm on this tiny random net amplify any perturbation, fp16 or not.)
    full, _ = _trained(make_cfg, feed="images", unfrozen=0)
    half, _ = _trained(make_cfg, "cache.dtype=float16", feed="cached", unfrozen=0)
    torch.testing.assert_close(half["head.weight"], full["head.weight"], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_a_deeper_cut_is_derived_from_the_deepest_shallower_one(make_cfg, outputs, dtype, tol):
    cfg = make_cfg()
    data = data_mod.load(cfg.dataset)
    model = _model(cfg, data, 2)  # frozen: units 0..6
    directory = outputs / "cache"
    cache.MEMORY.clear()
    cache.MEMORY.start_trial(2**30)
    feed, _ = cache.prefix_outputs(_prefix(cfg, model, data, dtype=dtype), 3, directory)
    assert feed.source == "filled"  # nothing below to derive from
    # The rows it passed at cuts 1 and 2 are entries too, costed as far as the pass got.
    costs = []
    for cut in (1, 2):
        passed, _ = cache.prefix_outputs(_prefix(cfg, model, data, dtype=dtype), cut, directory)
        assert passed.source == "hit (memory)"
        x = data.normalize(data.train.images)
        with torch.no_grad():
            for unit in model.units[:cut]:
                x = unit(x)
        # as a fill from the images at that cut
        torch.testing.assert_close(passed.rows.float(), x, rtol=tol, atol=tol)
        costs.append(passed.fill_time_s)
    assert 0 < costs[0] <= costs[1] <= feed.fill_time_s
    assert len(list(directory.glob("*.feat"))) == 3
    feed, _ = cache.prefix_outputs(_prefix(cfg, model, data, dtype=dtype), 6, directory)
    assert feed.source == "derived from cut 3"
    x = data.normalize(data.train.images)
    with torch.no_grad():
        for unit in model.units[:6]:
            x = unit(x)
    torch.testing.assert_close(feed.rows.float(), x, rtol=tol, atol=tol)
    # Its recorded cost is that of computing it from the images: parent's cost + derivation.
    parent, _ = cache.prefix_outputs(_prefix(cfg, model, data, dtype=dtype), 3, directory)
    assert feed.fill_time_s > parent.fill_time_s
    # Passed rows are kept only where they fit the RAM budget beside what it holds: with none,
    # a fill writes its own entry alone, and a shallower cut is filled when it is asked for.
    cache.MEMORY.clear()
    cache.MEMORY.start_trial(0)
    cache.prefix_outputs(_prefix(cfg, model, data, dtype=dtype), 3, outputs / "cold")
    assert len(list((outputs / "cold").glob("*.feat"))) == 1
    cold, _ = cache.prefix_outputs(_prefix(cfg, model, data, dtype=dtype), 1, outputs / "cold")
    assert cold.source == "filled"


def test_a_fill_keeps_passed_rows_only_where_recomputing_costs_more_than_copying():
    # The first batch's rows after each of 4 units (32 rows of a batch, 320 rows in all; 2 bytes
    # a value): unit 0's rows are 4x the last's, unit 1's 2x, unit 2's the same size.
    batch = [torch.zeros(32, 4, 8), torch.zeros(32, 2, 8), torch.zeros(32, 1, 8), torch.zeros(32, 1, 8)]
    last_bytes = 320 * 8 * 2
    # A CPU at 32 px: each unit's compute dwarfs copying its rows out: all are kept.
    keep = cache.worth_keeping(batch, [1.0] * 4, 1e-3, 320, torch.float16, room=2**30)
    assert keep == [True, True, True, True]
    # A GPU at 224 px: the first units' rows take longer to copy out (at the last one's rate)
    # than to compute again: only the rows that cost more to compute than to copy are kept.
    keep = cache.worth_keeping(batch, [0.1, 0.1, 0.5, 0.5], 0.2, 320, torch.float16, room=2**30)
    assert keep == [False, False, True, True]  # unit 0: 0.1 s < 0.8 s; unit 1: 0.2 s < 0.4 s
    # RAM for the last unit's rows and then some: passed rows are kept deepest first while
    # they fit, so a GB-sized shallow cut never crowds out the ones near the cut asked for.
    keep = cache.worth_keeping(batch, [1.0] * 4, 1e-3, 320, torch.float16, room=last_bytes)
    assert keep == [False, False, False, True]
    keep = cache.worth_keeping(batch, [1.0] * 4, 1e-3, 320, torch.float16, room=4 * last_bytes)
    assert keep == [False, True, True, True]


_FILLER = """
import sys, time
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
from sweeper import data as data_mod, feeds as cache
from sweeper.model import build
conf, go, out, *overrides = sys.argv[1:]
with initialize_config_dir(config_dir=conf, version_base="1.3"):
    cfg = compose("config", overrides=overrides)
data = data_mod.load(cfg.dataset)
torch.manual_seed(0)
model, _ = build(cfg.backbone, len(data.classes), 2, None)
Path(out + ".ready").touch()
while not Path(go).exists():
    time.sleep(0.002)
feeds = cache.for_trial(model, data, cfg.cache, None, torch.device("cpu"))
torch.save(feeds.train.rows.clone(), out)
print(feeds.train.source)
"""


def test_two_processes_filling_one_entry_leave_one_valid_entry(outputs, tmp_path):
    go = tmp_path / "go"
    overrides = ["backbone.weights=none", "dataset=fake", "dataset.size=600",
                 "dataset.train_per_class=150", f"paths.outputs={outputs}"]
    outs = [tmp_path / f"rows{i}.pt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _FILLER, str(ROOT / "conf"), str(go), str(out),
                               *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for out in outs]
    deadline = time.monotonic() + 120
    while not all(Path(f"{out}.ready").exists() for out in outs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    go.touch()  # both start filling the same entries at once
    sources = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        sources.append(stdout.strip().splitlines()[-1])
    assert sorted(sources) == ["filled", "hit (disk)"]
    entries = sorted((outputs / "cache" / "features").iterdir())
    # train and val at the cut (7) and at every cut the fill passed: 7 each (test runs
    # through the model in float32, as an export does)
    assert [e.suffix for e in entries].count(".feat") == 14
    assert not [e for e in entries if ".tmp" in e.name]
    a, b = (torch.load(out) for out in outs)
    assert torch.equal(a, b)


def test_an_entry_key_follows_the_images_also_changed_in_place(make_cfg):
    # A study's trials share the decoded images, which hash once; images changed in place
    # (a user's own data pipeline) must never find the entries of what they were before.
    data = data_mod.load(make_cfg().dataset)
    images = data.train.images.clone()
    split = data_mod.Split(images, data.train.labels)
    before = cache.split_digest(split, data.normalize)
    assert cache.split_digest(split, data.normalize) == before
    images[0] ^= 1
    after = cache.split_digest(split, data.normalize)
    assert after != before
    assert after == cache.split_digest(data_mod.Split(images.clone(), split.labels), data.normalize)


def test_a_truncated_or_corrupt_entry_is_rebuilt(make_cfg, outputs, caplog):
    cfg = make_cfg()
    data = data_mod.load(cfg.dataset)
    model = _model(cfg, data, 2)
    directory = outputs / "cache"
    cache.MEMORY.start_trial(2**30)  # RAM for the rows the fill passes: entries too
    first, _ = cache.prefix_outputs(_prefix(cfg, model, data), 4, directory)
    want = first.rows.clone()
    path = directory / f"{_prefix(cfg, model, data).key(4)}.feat"  # (and those it passed)
    for damage in ("truncate", "flip a byte"):
        cache.MEMORY.clear()
        raw = bytearray(path.read_bytes())
        if damage == "truncate":
            raw = raw[: len(raw) - 100]
        else:
            raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
        with caplog.at_level(logging.WARNING, logger="sweeper.feeds"):
            again, _ = cache.prefix_outputs(_prefix(cfg, model, data), 4, directory)
        assert again.source == "derived from cut 3", damage  # an entry its fill passed
        assert "Rebuilding corrupt or stale cache entry" in caplog.text
        assert torch.equal(again.rows, want)
        caplog.clear()
    cache.MEMORY.clear()
    hit, _ = cache.prefix_outputs(_prefix(cfg, model, data), 4, directory)
    assert hit.source == "hit (disk)" and torch.equal(hit.rows, want)


def test_cache_on_with_random_augmentation_is_a_config_error(make_cfg, cli):
    cfg = make_cfg("cache.mode=on", "augment=crop_flip")
    data = data_mod.load(cfg.dataset)
    model = _model(cfg, data, 2)
    with pytest.raises(UserError, match="cache.mode=on, but the train transform is random"):
        cache.for_trial(model, data, cfg.cache, data_mod.augment(cfg.augment), torch.device("cpu"))
    done = cli("cache.mode=on", "augment=crop_flip")
    assert done.returncode == 1
    assert "cannot be cached" in done.stderr and "Traceback" not in done.stderr


def test_cache_auto_with_random_augmentation_caches_val_and_test_only(make_cfg, caplog,
                                                                      mlflow_client):
    cfg = make_cfg("augment=crop_flip")
    with caplog.at_level(logging.INFO, logger="sweeper.feeds"):
        result = run_trial(cfg)
    assert "train runs through the frozen prefix, augment is random" in caplog.text
    tags = mlflow_client.get_run(result["run_id"]).data.tags
    assert tags["cache.train"].startswith("images (augment is random")
    assert tags["cache.val"] == "filled"
    assert tags["cache.test"] == "images (test runs as the exported model does, not rounded to float16)"
    off = run_trial(make_cfg("cache.mode=off"))
    assert mlflow_client.get_run(off["run_id"]).data.tags["cache.val"] == "images (cache.mode=off)"


def test_test_split_is_cached_only_where_that_changes_no_prediction(make_cfg):
    # test_acc is what the exported model (images, float32) scores: rows stored in float16
    # would flip borderline images, so test then runs through the model; float32 rows are exact.
    for dtype, cached in (("float16", False), ("float32", True)):
        cfg = make_cfg(f"cache.dtype={dtype}")
        data = data_mod.load(cfg.dataset)
        model, _ = build_model(cfg, len(data.classes), torch.device("cpu"))
        fed = cache.for_trial(model, data, cfg.cache, None, torch.device("cpu"))
        assert fed.val.source == "filled" and (fed.test.source == "filled") == cached, fed.test.source


def test_a_memory_budget_smaller_than_the_features_is_respected(make_cfg):
    big = run_trial(make_cfg())
    cache.MEMORY.clear()
    # At unfrozen=2 an image's prefix output is 256x2x2 fp16 (2 KiB): train (24 images, 48 KiB)
    # fits; val and test (24 KiB each) do not fit beside it and must not evict it: mapped.
    budget = 60 / 1024
    small = run_trial(make_cfg(f"cache.memory_budget_mb={budget}", "cache.dir=${paths.outputs}/c2"))
    assert small["cache_bytes"] > budget * 2**20
    assert 0 < cache.MEMORY.nbytes <= budget * 2**20
    assert small["cache_mapped_bytes"] == small["cache_bytes"] - cache.MEMORY.nbytes > 0
    assert small["val_acc"] == big["val_acc"] and small["test_acc"] == big["test_acc"]


def test_the_time_objective_does_not_depend_on_a_cold_or_warm_cache(make_cfg, mlflow_client):
    overrides = ("freeze.unfrozen=1", "dataset.size=600", "dataset.train_per_class=150",
                 "dataset.val_per_class=20", "dataset.test_per_class=10", "trainer.batch_size=32")
    cold = run_trial(make_cfg(*overrides))
    warm = run_trial(make_cfg(*overrides))
    assert cold["cache_hits"] == 0 and warm["cache_hits"] == 2  # train and val
    assert cold["cache_fill_time_s"] > 0 and warm["cache_fill_time_s"] == 0
    # Each trial is charged the costs its entries recorded when they were filled, whether it
    # filled them (cold) or found them (warm): the same components, not a wall-clock ratio.
    # The recorded costs, as any later reader of the entries finds them:
    cfg = make_cfg(*overrides)
    data = data_mod.load(cfg.dataset)
    model, _ = build_model(cfg, len(data.classes), torch.device("cpu"))
    found = cache.for_trial(model, data, cfg.cache, None, torch.device("cpu"))
    assert [f.source.startswith("hit") for f in (found.train, found.val)] == [True] * 2
    assert found.train.fill_time_s > 0
    for result in (cold, warm):
        # train_time_s also holds the one copy of the train rows to the device: on the CPU a
        # no-op of microseconds, hence the small absolute tolerance.
        assert result["train_time_s"] - result["train_steps_s"] == pytest.approx(
            found.train.fill_time_s, abs=0.01)
        assert result["cache_fill_charged_s"] == pytest.approx(
            found.train.fill_time_s + found.val.fill_time_s)
    # Without the charge the warm trial would look cheaper by the whole fill.
    metrics = mlflow_client.get_run(warm["run_id"]).data.metrics
    for name in ("cache_hits", "cache_fill_time_s", "cache_fill_charged_s", "cache_bytes"):
        assert name in metrics, name


def test_target_bn_stats_get_their_own_entries_and_reuse_them(make_cfg, mlflow_client):
    source = run_trial(make_cfg("freeze.unfrozen=0"))
    target = run_trial(make_cfg("freeze.unfrozen=0", "freeze.bn_stats=target"))
    again = run_trial(make_cfg("freeze.unfrozen=0", "freeze.bn_stats=target"))
    # Features of the re-estimated prefix are never served from the source prefix's entries;
    # the re-estimation is deterministic, so the next trial finds its own.
    assert source["cache_hits"] == 0 and target["cache_hits"] == 0 and again["cache_hits"] == 2
    assert again["val_acc"] == target["val_acc"]
    metrics = mlflow_client.get_run(target["run_id"]).data.metrics
    assert metrics["bn_stats_time_s"] > 0
    assert metrics["train_time_s"] >= metrics["bn_stats_time_s"]
