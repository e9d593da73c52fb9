"""On a CUDA device (``pytest -m gpu``; skipped where there is none, as in CI): copies between host
and GPU, the cache, a trial on every path the README names, each backbone family, source
pretraining, a study (also two trials at once on one GPU), rerun and the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sweeper import data as data_mod
from sweeper import device as dev
from sweeper import feeds as cache
from sweeper.model import build
from sweeper.rerun import rerun
from sweeper.trial import run_trial
from tests.conftest import ROOT
from tests.test_study import STUDY, check_consistent, load_study

pytestmark = [pytest.mark.gpu,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

ON_GPU = ["trainer.device=cuda"]


@pytest.fixture(autouse=True)
def empty_memory():
    cache.MEMORY.clear()
    yield
    cache.MEMORY.clear()


def test_the_resolved_device_is_the_one_tensors_report():
    device = dev.resolve_device("auto")
    assert device.type == "cuda" and device.index == torch.cuda.current_device()
    x = torch.zeros(3).to(device)
    assert x.device == device and dev.transfer(x.device, device) == "none"


def test_batches_reach_the_gpu_exactly_from_ram_a_memory_map_and_the_gpu(tmp_path):
    device = dev.resolve_device("cuda")
    rows = torch.randn(300, 8, 4, 4).half()
    mm = np.memmap(tmp_path / "rows", dtype=np.float16, mode="w+", shape=tuple(rows.shape))
    mm[:] = rows.numpy()
    labels = torch.arange(300)
    feeds = {"ram": cache.Feed(rows, labels, dev.as_input, "filled"),
             "mapped": cache.Feed(torch.from_numpy(mm), labels, dev.as_input, "filled", mapped=True)}
    feeds["gpu"] = feeds["ram"].on(device, budget=2**30)
    assert feeds["gpu"].rows.device == device and feeds["gpu"].labels.device == device
    assert feeds["ram"].on(device, budget=0) is feeds["ram"]  # over the budget: stays on the host
    gen = torch.Generator().manual_seed(0)
    for name, feed in feeds.items():
        # Many batches queued before any is read: a page-locked buffer reused too early
        # would show up as a batch that is not its rows.
        orders = [torch.randperm(300, generator=gen)[:64] for _ in range(40)]
        got = [feed.batch(idx.to(feed.rows.device), device) for idx in orders]
        for idx, (x, y) in zip(orders, got, strict=True):
            assert x.device == device and y.device == device, name
            assert torch.equal(x.cpu(), rows[idx]) and torch.equal(y.cpu(), idx), name
        x = dev.as_input(feed.batch(slice(290, 310), device)[0])
        assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
        assert torch.equal(x.cpu(), rows[290:].float())
    assert torch.equal(dev.upload(feeds["mapped"].rows, device, chunk_bytes=1000).cpu(), rows)


def _train_prefix(model, data, dtype: torch.dtype, device: torch.device) -> cache.Prefix:
    """The train split's frozen prefix on the GPU under bf16 autocast, as a trial keys it."""
    return cache.Prefix(model, data.train, data.normalize.to(device), dtype, device, True,
                        cache.split_digest(data.train, data.normalize),
                        [cache.unit_digest(u) for u in model.frozen_units()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_cut_filled_and_derived_on_the_gpu_matches_the_prefix(make_cfg, outputs, dtype):
    cfg = make_cfg(*ON_GPU)
    device = dev.resolve_device("cuda")
    data = data_mod.load(cfg.dataset)
    torch.manual_seed(0)
    model = dev.place_model(build(cfg.backbone, len(data.classes), 2, None)[0], device)
    normalize = data.normalize.to(device)
    prefix = _train_prefix(model, data, dtype, device)
    assert cache.prefix_outputs(prefix, 3, outputs / "c")[0].source == "filled"
    feed, _ = cache.prefix_outputs(prefix, 6, outputs / "c")
    assert feed.source == "derived from cut 3" and feed.rows.device.type == "cpu"
    with torch.no_grad(), dev.autocast(device, True):
        x = dev.as_input(normalize(data.train.images.to(device)))
        for unit in model.units[:6]:
            x = unit(x)
    # bf16 autocast both ways, rounded at different points: close, not equal
    torch.testing.assert_close(feed.rows.float(), x.float().cpu(), rtol=5e-2, atol=5e-2)


def test_a_fill_at_224_px_keeps_none_of_the_larger_rows_it_passes(make_cfg, outputs):
    # ResNet-50's rows after each layer1 block at 224 px are 1.6 MB an image, twice those at
    # cut 5: the GPU computes them again faster than it copies them out, so a fill at cut 5
    # does not keep them (at 32 px on the CPU it keeps every cut it passes: tests/test_cache.py).
    cfg = make_cfg(*ON_GPU, "backbone=resnet50", "dataset.image_size=224", "dataset.size=600",
                   "dataset.train_per_class=160")
    device = dev.resolve_device("cuda")
    data = data_mod.load(cfg.dataset)
    model = dev.place_model(build(cfg.backbone, len(data.classes), 12, None)[0], device)
    assert model.cut == 5
    cache.MEMORY.start_trial(2**36)  # RAM for every passed cut: the cost alone decides
    prefix = _train_prefix(model, data, torch.float16, device)
    feed, _ = cache.prefix_outputs(prefix, 5, outputs / "c")
    assert feed.source == "filled" and len(feed) == 480
    written = {p.stat().st_size for p in (outputs / "c").glob("*.feat")}
    assert max(written) <= (outputs / "c" / f"{prefix.key(5)}.feat").stat().st_size


def test_a_fill_the_trial_keeps_on_the_gpu_is_written_behind_it(make_cfg, outputs):
    # The rows stay on the GPU for the trial (no copy out and back); the entry file is written
    # from a copy in the background, and whoever wants the entry meanwhile waits for it.
    cfg = make_cfg(*ON_GPU)
    device = dev.resolve_device("cuda")
    data = data_mod.load(cfg.dataset)
    model = dev.place_model(build(cfg.backbone, len(data.classes), 2, None)[0], device)
    cache.MEMORY.start_trial(2**30)
    prefix = _train_prefix(model, data, torch.float16, device)
    feed, _ = cache.prefix_outputs(prefix, model.cut, outputs / "c", device_room=2**30)
    assert feed.source == "filled" and feed.rows.device == feed.labels.device == device
    cache.MEMORY.clear()  # (the writer may put its copy back in RAM after this)
    again, _ = cache.prefix_outputs(prefix, model.cut, outputs / "c")
    assert again.source.startswith("hit") and again.rows.device.type == "cpu"
    assert torch.equal(again.rows, feed.rows.cpu())
    # without room on the GPU the rows come to the host, as every fill's do on the CPU
    cut = model.cut - 1
    assert cache.prefix_outputs(prefix, cut, outputs / "c")[0].rows.device.type == "cpu"


def test_a_download_behind_the_trial_copies_every_byte():
    # Through the page-locked buffer in chunks: three whole ones and a last one of 14 bytes.
    device = dev.resolve_device("cuda")
    rows = torch.randn(3 * dev.STAGE_BYTES // 2 + 7, device=device).half()
    host = dev.download(rows, dev.ready_event(device))
    assert host.device.type == "cpu" and host.dtype == rows.dtype and torch.equal(host, rows.cpu())


def test_a_splits_cache_key_never_waits_for_the_gpu(make_cfg):
    # Keys are made while the writer behind a GPU fill copies GBs off the GPU: a key that read
    # the normalisation back from the GPU waited for all of it (5 s of the GPU benchmark).
    data = data_mod.load(make_cfg(*ON_GPU).dataset)
    on_host = cache.split_digest(data.train, data_mod.Normalize(*data.normalize.stats))
    on_gpu = data_mod.Normalize(*data.normalize.stats).to(dev.resolve_device("cuda"))
    torch.cuda.set_sync_debug_mode("error")  # raises at any operation that waits for the GPU
    try:
        key = cache.split_digest(data.train, on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert key == on_host


@pytest.mark.parametrize("overrides", [
    ["freeze.unfrozen=2"],  # cached train/val/test, kept on the GPU
    ["freeze.unfrozen=9"],  # nothing frozen: images on the GPU, whole model every step
    ["freeze.unfrozen=2", "freeze.bn_stats=target"],
    ["freeze.unfrozen=2", "augment=crop_flip"],  # train through the prefix, augmented on the GPU
    # entries memory-mapped (RAM budget ~0) and copied batch by batch (GPU budget 0)
    ["freeze.unfrozen=2", "cache.memory_budget_mb=0.001", "cache.device_budget_mb=0"],
    ["freeze.unfrozen=4", "trainer.compile=true"],
    ["freeze.unfrozen=4", "trainer.deterministic=true"],
    # freezing over time: per-run entries on the GPU; shared entries placed as the cut moves
    ["freeze=progressive", "trainer.epochs=4"],
    ["freeze=progressive", "trainer.epochs=4", "cache.device_budget_mb=0"],
    ["freeze=gradual", "trainer.epochs=4"],
], ids=["cache", "no-cache", "bn-target", "crop-flip", "mapped", "compile", "deterministic",
        "progressive", "progressive-copied", "gradual"])
def test_a_trial_runs_on_the_gpu(make_cfg, mlflow_client, overrides):
    result = run_trial(make_cfg(*ON_GPU, "trainer.epochs=2", *overrides))
    run = mlflow_client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "complete"
    assert 0 <= result["val_acc"] <= 1 and 0 <= result["test_acc"] <= 1
    assert result["train_time_s"] > 0 and result["peak_memory_mb"] > 0
    if "cache.memory_budget_mb=0.001" in overrides:
        assert result["cache_mapped_bytes"] > 0


def test_a_warm_cache_on_the_gpu_is_hit_and_charged_the_same(make_cfg):
    overrides = (*ON_GPU, "freeze.unfrozen=1", "trainer.epochs=2")
    cold = run_trial(make_cfg(*overrides))
    warm = run_trial(make_cfg(*overrides))
    # train and val rows come from the cache; the test set runs on images, as the exported model does
    assert cold["cache_hits"] == 0 and warm["cache_hits"] == cold["cache_entries"] == 2
    assert warm["cache_fill_charged_s"] == pytest.approx(cold["cache_fill_charged_s"])


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenet_v3_small",
                                      "efficientnet_b0", "convnext_tiny", "vit_b_16"])
def test_every_backbone_family_trains_on_the_gpu(make_cfg, backbone):
    result = run_trial(make_cfg(*ON_GPU, f"backbone={backbone}", "freeze.unfrozen=2"))
    assert 0 <= result["val_acc"] <= 1 and result["peak_memory_mb"] > 0


def test_source_pretraining_on_the_gpu_then_transfer(make_cfg, outputs, mlflow_client):
    # Fashion-MNIST where benchmarks/gpu/run.sh lays it out, else Debian's package as usual
    laid_out = ROOT / "outputs" / "data"
    data = [f"paths.data={laid_out}"] if (laid_out / "FashionMNIST" / "raw").is_dir() else []
    small = [*data, "source.dataset.train_per_class=40", "source.dataset.val_per_class=10",
             "source.dataset.test_per_class=10", "source.trainer.epochs=1",
             "dataset=fashion_mnist", "dataset.train_per_class=10", "dataset.val_per_class=10",
             "dataset.test_per_class=10"]
    result = run_trial(make_cfg(*ON_GPU, "backbone.weights=source", *small))
    tags = mlflow_client.get_run(result["run_id"]).data.tags
    assert tags["weights"].startswith("source:") and tags["pretrain_run_id"]
    assert list((outputs / "pretrained").glob("resnet18-*.pt"))


def test_rerun_on_the_gpu(make_cfg, outputs):
    original = run_trial(make_cfg(*ON_GPU, "freeze.unfrozen=3"))
    again = rerun(original["run_id"], f"sqlite:///{outputs}/mlflow.db")
    assert 0 <= again["val_acc"] <= 1 and again["run_id"] != original["run_id"]


def test_a_study_and_its_report_on_the_gpu(cli, outputs, mlflow_client):
    done = cli("trainer.device=auto", "hydra.sweeper.n_trials=3", flags=("-m",))
    assert done.returncode == 0, done.stderr[-4000:]
    study = load_study(outputs)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    check_consistent(study, mlflow_client)
    assert (outputs / "studies" / STUDY / "report" / "report.md").exists()


def test_two_trials_at_once_on_one_gpu(cli, outputs, mlflow_client):
    done = cli("trainer.device=auto", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2",
               "hydra.sweeper.n_trials=4", flags=("-m",))
    assert done.returncode == 0, done.stderr[-4000:]
    study = load_study(outputs)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    check_consistent(study, mlflow_client)
