"""Naive fine-tuning against this project's trial path at a realistic size, on a GPU.

    python -m benchmarks.gpu_speed [--epochs 3] [--depths 17,12,8,4,3,0] [--no-bn] [--no-table]
                                   [--study every-depth|default|none] [--study-epochs 10]
                                   [--study-trials N]
                                   [--naive-workers N] [--tiny] [OVERRIDE ...]

ResNet-50 at 224 px, pretrained here on Fashion-MNIST classes 0-4 (``backbone.weights=source``,
once, before anything is timed), fine-tuned on classes 5-9 upscaled: 1,000 training, 200
validation and 200 test images per class, batch 128, bf16 autocast, channels_last.

naive: the usual GPU recipe -- a ``DataLoader`` with worker processes and pinned memory over a
dataset that transforms one image at a time, bf16 autocast, ``requires_grad=False`` on the
frozen units, ``model.train()`` on the whole model, a full forward every step, torch's default
SGD over the trainable parameters (``benchmarks.freeze_speed``'s naive, with workers).
ours: the project's trial path (``sweeper.trial``): frozen-prefix cache, rows kept on the GPU,
batched uint8 data path, fused SGD.

For each depth (units left trainable), naive's epochs then ours' (each with only its own
objects on the GPU): median epoch time, images/s, peak GPU memory, validation accuracy, and
ours with ``freeze.bn_stats=target`` (the frozen BatchNorm statistics re-estimated on the
target images, which is what naive's train-mode BatchNorm ends up doing) for accuracy at equal
statistics. Then a study both ways (each depth once, at the config's 10 epochs per trial as a
user's study has; each recipe in its own fresh process, trials alternating), its wall-time
ratio and the bound no cache can beat (naive's wall time / ours' time in trainable training
steps), and the targets for an H100 at batch 128. Extra arguments are Hydra overrides.
``--tiny`` runs the same code on a tiny setting in seconds on a CPU (a smoke run; it measures
nothing). Not a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks import freeze_speed as fs
from sweeper import data as data_mod
from sweeper import feeds
from sweeper.background import ENTRIES
from sweeper.config import compose
from sweeper.device import resolve_device
from sweeper.pretrain import resolve_weights
from sweeper.train import peak_memory_mb, reset_peak_memory
from sweeper.trial import seed_everything

REALISTIC = [
    "backbone=resnet50",
    "dataset.image_size=224",
    "dataset.train_per_class=1000",
    "dataset.val_per_class=200",
    "dataset.test_per_class=200",
    "trainer.batch_size=128",
    "trainer.amp=true",
    # A GPU machine has RAM to spare: keep the study's entries (about 12 GB at 224 px: train and
    # val at cuts 5, 9, 13, 14 and 17) in RAM, with little room for more: a fill may also write
    # the rows it passes within this budget, and the table's fills and the study's each write
    # their own (the first run on an H200, when fills kept every cut they passed whatever the
    # budget, filled its 63 GB of free disk at depth 12).
    "cache.memory_budget_mb=16384",
]
TINY = [
    "backbone=resnet18",
    "backbone.weights=none",
    "dataset.image_size=32",
    "dataset.train_per_class=8",
    "dataset.val_per_class=4",
    "dataset.test_per_class=4",
    "trainer.batch_size=8",
]
# Targets on an H100 at batch 128 (issue 9).
FULL_IMG_S, LAYER4_IMG_S, HEAD_RATIO, STUDY_SHARE, ACC_POINTS = 3500, 20000, 30.0, 0.8, 1.0


def _free(device: torch.device) -> None:
    """Give back what the last recipe left on the GPU, so the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device} (no GPU: a smoke run, not a measurement)"
    return (f"{torch.cuda.get_device_name(device)} ({device}; torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")


def _trainable(names: list[str], unfrozen: int) -> str:
    if unfrozen == 0:
        return "head"
    if unfrozen == len(names):
        return "all"
    return f"{names[len(names) - unfrozen]}.."


def depth_row(cfg: DictConfig, data: data_mod.Data, state, origin: str, unfrozen: int,
              device: torch.device, opts: argparse.Namespace) -> dict:
    """naive's epochs, then ours', then ours with bn_stats=target (accuracy): one table row."""
    cuda = device.type == "cuda"
    n_used = len(data.train) - (1 if len(data.train) % int(cfg.trainer.batch_size) == 1 else 0)
    row: dict = {"unfrozen": unfrozen}

    seed_everything(cfg.trainer, device)
    _free(device)
    reset_peak_memory(device)
    net = fs.ours_net(cfg, data, state, origin, unfrozen, device)  # same initial weights as ours
    row["names"] = net.unit_names
    naive = list(fs.naive_epochs(net, data, cfg, device, opts))
    row["naive_s"] = statistics.median(t for t, _ in naive)
    row["naive_val"] = naive[-1][1]
    row["naive_peak_mb"] = peak_memory_mb(device) if cuda else None
    del net, naive

    seed_everything(cfg.trainer, device)
    _free(device)
    reset_peak_memory(device)
    net = fs.ours_net(cfg, data, state, origin, unfrozen, device)
    times, row["ours_val"], fed = fs.ours_fit(net, data, cfg, device, on_epoch=None)
    row["ours_s"] = statistics.median(times)
    row["ours_peak_mb"] = peak_memory_mb(device) if cuda else None
    row["fill_s"] = fed.train.fill_time_s
    del net, fed

    if opts.bn:  # its entries (GBs at 224 px) go to a folder of their own, removed after the row
        bn_dir = Path(str(cfg.cache.dir)).with_name("cache-bn")
        cfg_bn = OmegaConf.merge(cfg, {"cache": {"dir": str(bn_dir)}})
        seed_everything(cfg.trainer, device)
        _free(device)
        net = fs.ours_net(cfg_bn, data, state, origin, unfrozen, device, "target")
        row["bn_val"] = fs.ours_fit(net, data, cfg_bn, device, on_epoch=None)[1]
        del net
        ENTRIES.drain()  # the entries a fill left on the GPU are written in the background
        shutil.rmtree(bn_dir, ignore_errors=True)
        feeds.MEMORY.clear()
    row["naive_img_s"], row["ours_img_s"] = n_used / row["naive_s"], n_used / row["ours_s"]
    row["ratio"] = row["naive_s"] / row["ours_s"]
    return row


def _gb(mb: float | None) -> str:
    return "n/a" if mb is None else f"{mb / 1024:.1f}"


def print_row(row: dict) -> None:
    bn = f"{row['bn_val']:>7.3f}" if "bn_val" in row else f"{'–':>7}"
    print(f"{row['unfrozen']:>8} {_trainable(row['names'], row['unfrozen']):>10} | "
          f"{row['naive_s']:>8.3f} {row['ours_s']:>8.4f} {row['ratio']:>6.1f}x | "
          f"{row['naive_img_s']:>8.0f} {row['ours_img_s']:>8.0f} | "
          f"{_gb(row['naive_peak_mb']):>7} {_gb(row['ours_peak_mb']):>6} | "
          f"{row['naive_val']:>6.3f} {row['ours_val']:>6.3f} {bn} | {row['fill_s']:>6.2f}", flush=True)


HEADER = (f"{'unfrozen':>8} {'trainable':>10} | {'naive s':>8} {'ours s':>8} {'ratio':>7} | "
          f"{'naive/s':>8} {'ours/s':>8} | {'naive GB':>7} {'ours GB':>6} | "
          f"{'naive':>6} {'ours':>6} {'ours+bn':>7} | {'fill s':>6}")


def _verdict(device: torch.device, batch_size: int) -> Callable[[bool], str]:
    """The targets were set on an H100; an H200 has the same chip (GH100, 132 SMs, same clocks)
    with faster memory, so it is judged too, and says so."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    if batch_size != 128 or not ("H100" in name or "H200" in name):
        return lambda ok: "not judged (not an H100 at batch 128)"
    note = "" if "H100" in name else " (on an H200: the H100's chip with faster memory)"
    return lambda ok: ("met" if ok else "NOT met") + note


def table_targets(rows: dict[int, dict], n_units: int, layer4: int,
                  verdict: Callable[[bool], str]) -> list[str]:
    """One line per target of issue 9 that the table measured, with its verdict."""
    lines = []
    if n_units in rows:
        v = rows[n_units]["ours_img_s"]
        lines.append(f"full fine-tuning through the whole data path: {v:,.0f} img/s "
                     f"(>= {FULL_IMG_S:,}): {verdict(v >= FULL_IMG_S)}")
    if layer4 in rows:
        v = rows[layer4]["ours_img_s"]
        lines.append(f"layer4 trainable (unfrozen {layer4}): {v:,.0f} img/s (>= {LAYER4_IMG_S:,}): "
                     f"{verdict(v >= LAYER4_IMG_S)}")
    if 0 in rows:
        v = rows[0]["ratio"]
        lines.append(f"head only: {v:.1f}x naive per epoch (>= {HEAD_RATIO:.0f}x): "
                     f"{verdict(v >= HEAD_RATIO)}")
    with_bn = [r for r in rows.values() if "bn_val" in r]
    if with_bn:
        gap = max(abs(r["bn_val"] - r["naive_val"]) * 100 for r in with_bn)
        gap_src = max(abs(r["ours_val"] - r["naive_val"]) * 100 for r in rows.values())
        lines.append(f"accuracy: ours+bn within {gap:.1f} points of naive at every depth "
                     f"(<= {ACC_POINTS:.0f}): {verdict(gap <= ACC_POINTS)}; ours (bn_stats=source) "
                     f"within {gap_src:.1f}")
    return lines


def study_target(study: dict, verdict: Callable[[bool], str]) -> str:
    ratio = study["naive"]["wall_s"] / study["ours"]["wall_s"]
    bound = study["naive"]["wall_s"] / study["ours"]["steps_s"]
    return (f"whole study: {ratio:.2f}x of a {bound:.2f}x bound = {ratio / bound:.0%} "
            f"(>= {STUDY_SHARE:.0%}): {verdict(ratio >= STUDY_SHARE * bound)}")


def table(cfg: DictConfig, state, origin: str, depths: list[int], device: torch.device,
          verdict: Callable[[bool], str], work: Path, args: argparse.Namespace) -> None:
    """The per-depth table (naive's epochs, then ours', at each depth) and its targets."""
    n_units = int(cfg.backbone.num_units)
    data = data_mod.load(cfg.dataset)
    print(f"{cfg.backbone.name}, {n_units} freeze units, {cfg.dataset.name} classes "
          f"{list(cfg.dataset.classes)} at {cfg.dataset.image_size} px: {len(data.train)} train / "
          f"{len(data.val)} val / {len(data.test)} test, batch {cfg.trainer.batch_size}, "
          f"{cfg.trainer.epochs} epochs, bf16 autocast {'on' if cfg.trainer.amp else 'off'} (GPU only), "
          f"channels_last (GPU only), cache {cfg.cache.dtype}; weights {origin}")
    print(f"naive: DataLoader (workers: {args.naive_workers}, pinned memory on a GPU, per-sample "
          "transforms), autocast, requires_grad=False, model.train(), full forward, torch's default "
          "SGD; ours: the trial path (cache, rows kept on the GPU, fused SGD)", flush=True)
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    rows = {}
    for unfrozen in depths:
        rows[unfrozen] = depth_row(cfg, data, state, origin, unfrozen, device, args)
        print_row(rows[unfrozen])
    print("s: median epoch time (training steps, synchronised); /s: training images per second; "
          "GB: peak GPU memory of the recipe; naive/ours/ours+bn: validation accuracy after the "
          "last epoch; fill s: ours' one-off train cache fill")
    layer4 = sum(name.startswith("layer4") for name in rows[depths[0]]["names"])
    print(f"targets (an H100 at batch 128; measured on {_describe(device)}):")
    for line in table_targets(rows, n_units, layer4, verdict):
        print(f"  {line}", flush=True)
    del data
    ENTRIES.drain()
    shutil.rmtree(work / "cache-table", ignore_errors=True)  # GBs at 224 px; the study fills its own


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per depth in the table (default 3, --tiny 2): the table takes "
                             "the median epoch, so 3 or more leave the first, warm-up epoch out")
    parser.add_argument("--study-epochs", type=int, default=None,
                        help="epochs per trial of the study (default: the config's trainer.epochs, "
                             "10, as a user's study has; --tiny 2)")
    parser.add_argument("--depths", default=None,
                        help="units left trainable, comma-separated (default 17,12,8,4,3,0: all, "
                             "..., layer3.5 + layer4, layer4, head only)")
    parser.add_argument("--no-table", dest="table", action="store_false",
                        help="skip the per-depth table: the study only (with its pretraining)")
    parser.add_argument("--no-bn", dest="bn", action="store_false",
                        help="skip the ours+bn accuracy column (saves one fit per depth)")
    parser.add_argument("--study", choices=("every-depth", "default", "none"), default="every-depth",
                        help="every-depth: each of --depths once; default: the trials of "
                             "`python -m sweeper.run -m`'s study (--study-trials of them); none: skip")
    parser.add_argument("--study-trials", type=int, default=None, help="trials in the study")
    parser.add_argument("--naive-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes of the naive recipe")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny setting (ResNet-18, 32 px, 8 images per class, no pretraining, "
                             "depths 9,2,0): seconds on a CPU")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    args.naive_data, args.naive_fused = "loader", False  # the usual recipe (benchmarks.freeze_speed)
    if args.tiny:
        args.naive_workers = min(args.naive_workers, 1)
        args.study_epochs = args.study_epochs or 2
        args.study_trials = args.study_trials or 2
    args.epochs = args.epochs or (2 if args.tiny else 3)
    depths = [int(d) for d in (args.depths or ("9,2,0" if args.tiny else "17,12,8,4,3,0")).split(",")]

    overrides = [*(TINY if args.tiny else REALISTIC), *args.overrides]
    asked = compose(overrides=overrides)
    on_cpu = str(asked.trainer.device) == "auto" and resolve_device("auto").type != "cuda"
    if on_cpu and not args.tiny:
        sys.exit("No CUDA device here: at its realistic size (ResNet-50 at 224 px) this benchmark "
                 "takes hours on a CPU. Run it on a GPU machine (benchmarks/gpu/run.sh carries "
                 "what it needs), add --tiny for a smoke run of the same code here, or run "
                 "python -m benchmarks.freeze_speed, the CPU benchmark. trainer.device=cpu runs "
                 "it here anyway.")
    outputs = Path(asked.paths.outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_speed-", dir=outputs))
    base = [*overrides, f"paths.outputs={outputs}", f"tracking.uri=sqlite:///{work}/mlflow.db",
            f"tracking.artifact_location={work}/mlartifacts"]
    cfg = compose(overrides=[*base, f"trainer.epochs={args.epochs}", f"cache.dir={work}/cache-table"])
    n_units = int(cfg.backbone.num_units)
    bad = [d for d in depths if not 0 <= d <= n_units]
    if bad:
        sys.exit(f"--depths {bad}: {cfg.backbone.name} has {n_units} freeze units (0..{n_units}).")
    device = resolve_device(str(cfg.trainer.device))
    verdict = _verdict(device, int(cfg.trainer.batch_size))
    state, origin = resolve_weights(cfg)  # pretrain the source checkpoint first: not timed
    print(f"device: {_describe(device)}")
    if args.table:
        table(cfg, state, origin, depths, device, verdict, work, args)
    if args.study != "none":
        epochs = args.study_epochs or int(compose(overrides=base).trainer.epochs)
        print(f"study: {epochs} epochs per trial", flush=True)
        study = fs.study_lines(cfg, args, [*base, f"trainer.epochs={epochs}"], work, depths)
        shutil.rmtree(work / "cache-study", ignore_errors=True)
        if device.type == "cuda":
            print(f"study peak GPU memory: naive {_gb(study['naive']['peak_memory_mb'])} GB, "
                  f"ours {_gb(study['ours']['peak_memory_mb'])} GB")
        print(f"  {study_target(study, verdict)}")
    print(f"MLflow runs of the study: {work}/mlflow.db")


if __name__ == "__main__":
    main()
