"""Naive freezing against this project's trial path, side by side, on the default trial.

    .venv/bin/python -m benchmarks.freeze_speed [--epochs N] [--study-trials N] [OVERRIDE ...]

naive: the usual PyTorch recipe -- ``requires_grad=False`` on the frozen units, the whole model
in train mode, a full forward every step, an optimizer over the trainable parameters.
ours:  ``sweeper.train.fit`` fed by the frozen-prefix cache (``sweeper.cache``).

Same data, epochs, batch size, seeds and optimizer. Prints, per depth unfrozen in {N, N//2,
2, 0} (N = freeze units), the median epoch time of each, their ratio and both validation
accuracies; then a cache-budget check and, last, the wall time of the same small study (every
depth once, in a fixed shuffled order) both ways, each study in a fresh process with a cold
cache. Naive and ours alternate (epoch by epoch in the table, trial by trial in the study), so
a machine shared with other work slows both alike: the ratios are what to compare. OVERRIDEs
are Hydra overrides of conf/config.yaml (e.g. ``backbone=resnet50``). Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

from sweeper import cache, weights
from sweeper import data as data_mod
from sweeper.freeze import FreezeNet
from sweeper.model import build
from sweeper.tracking import Tracker
from sweeper.train import fit, make_optimizer, resolve_device
from sweeper.trial import _log_inputs, run_trial, seed_everything

ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


# --- naive ---------------------------------------------------------------------------------

def naive_epochs(net: FreezeNet, data: data_mod.Data, cfg: DictConfig, device: torch.device):
    """The usual recipe, one epoch per ``next()``: yields (training time s, val accuracy)."""
    model = nn.Sequential(*net.units, net.head).to(device)  # plain train(): frozen BN moves too
    bs, n = int(cfg.trainer.batch_size), len(data.train)
    n_used = n - 1 if n % bs == 1 and n > 1 else n
    opt, sched = make_optimizer(net, cfg.optim, math.ceil(n_used / bs) * int(cfg.trainer.epochs))
    normalize = data.normalize.to(device)
    gen = torch.Generator().manual_seed(int(cfg.trainer.seed))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(int(cfg.trainer.epochs)):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)[:n_used]
        for start in range(0, n_used, bs):
            idx = order[start:start + bs]
            x, y = data.train.images[idx].to(device), data.train.labels[idx].to(device)
            loss = loss_fn(model(normalize(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        elapsed = time.perf_counter() - t0
        yield elapsed, naive_accuracy(model, data.val, normalize, device, bs * 4)


@torch.no_grad()
def naive_accuracy(model: nn.Module, split: data_mod.Split, normalize, device, bs: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), bs):
        x = split.images[start:start + bs].to(device)
        correct += int((model(normalize(x)).argmax(1) == split.labels[start:start + bs].to(device)).sum())
    return correct / len(split)


def naive_trial(cfg: DictConfig) -> dict:
    """``run_trial``'s steps (data, weights, model, MLflow run) with the naive training recipe."""
    device = resolve_device(str(cfg.trainer.device))
    run = Tracker(cfg.tracking).start(f"naive-unfrozen{cfg.freeze.unfrozen}",
                                      tags={"sweeper.kind": "benchmark-naive"})
    _log_inputs(run, cfg, [], None)  # the same MLflow writes as run_trial
    seed_everything(cfg.trainer)
    data = data_mod.load(cfg.dataset)
    state, origin = weights.resolve(cfg)
    torch.manual_seed(int(cfg.trainer.seed))
    net, _ = build(cfg.backbone, len(data.classes), int(cfg.freeze.unfrozen), state, origin)
    times, val_acc = [], 0.0
    for epoch, (t, val_acc) in enumerate(naive_epochs(net, data, cfg, device), 1):
        times.append(t)
        run.metrics({"epoch_time_s": t, "val_acc": val_acc}, step=epoch)
    model = nn.Sequential(*net.units, net.head)
    test_acc = naive_accuracy(model, data.test, data.normalize.to(device), device,
                              int(cfg.trainer.batch_size) * 4)
    run.metrics({"val_acc": val_acc, "test_acc": test_acc, "train_time_s": sum(times),
                 "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    run.end()
    return {"val_acc": val_acc, "test_acc": test_acc, "train_time_s": sum(times)}


# --- ours ----------------------------------------------------------------------------------

def ours_fit(net: FreezeNet, data: data_mod.Data, cfg: DictConfig, device: torch.device, on_epoch):
    feeds = cache.feeds(net, data, cfg.cache, data_mod.augment(cfg.get("augment")), device,
                        bool(cfg.trainer.amp))
    result = fit(net, data, cfg.trainer, cfg.optim, device, on_epoch=on_epoch, feeds=feeds)
    return [e.epoch_time_s for e in result.epochs], result.val_acc, feeds


# --- the parts -----------------------------------------------------------------------------

def depth_table(cfg: DictConfig) -> None:
    device = resolve_device(str(cfg.trainer.device))
    seed_everything(cfg.trainer)
    data = data_mod.load(cfg.dataset)
    state, origin = weights.resolve(cfg)
    n = int(cfg.backbone.num_units)
    print(f"{cfg.backbone.name}, {n} freeze units, {cfg.dataset.name} {cfg.dataset.image_size}px, "
          f"{len(data.train)} train / {len(data.val)} val images, {cfg.trainer.epochs} epochs, "
          f"batch {cfg.trainer.batch_size}, {device.type} x{torch.get_num_threads()} threads, "
          f"cache dtype {cfg.cache.dtype}")
    head = (f"{'unfrozen':>8} {'frozen':>6} | {'naive s/ep':>10} {'ours s/ep':>9} {'ratio':>7} | "
            f"{'naive val':>9} {'ours val':>8} | {'fill s (once)':>13}")
    print(head)
    print("-" * len(head))
    for unfrozen in (n, n // 2, 2, 0):
        nets = []
        for _ in range(2):  # identical initial weights and head for both
            torch.manual_seed(int(cfg.trainer.seed))
            nets.append(build(cfg.backbone, len(data.classes), unfrozen, state, origin)[0].to(device))
        # Lockstep: one naive epoch after each of ours, so both see the same machine load.
        naive = naive_epochs(nets[0], data, cfg, device)
        naive_runs = []
        times, acc, feeds = ours_fit(nets[1], data, cfg, device,
                                     on_epoch=lambda _s, g=naive, r=naive_runs: r.append(next(g)))
        naive_times = [t for t, _ in naive_runs]
        ratio = statistics.median(tn / to for tn, to in zip(naive_times, times, strict=True))
        print(f"{unfrozen:>8} {n - unfrozen:>6} | {statistics.median(naive_times):>10.3f} "
              f"{statistics.median(times):>9.4f} {ratio:>6.1f}x | {naive_runs[-1][1]:>9.3f} {acc:>8.3f} | "
              f"{feeds.train.fill_time_s:>13.2f}", flush=True)
    print("ratio: median over epochs of naive epoch time / ours (epochs run alternately)")


def worker(kind: str, overrides: list[str]) -> None:
    """Run one trial per ``unfrozen`` read from stdin; answer each with a JSON line."""
    logging.getLogger().setLevel(logging.WARNING)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        cfg = compose_cfg([*overrides, f"freeze.unfrozen={int(line)}"])
        t0, c0 = time.perf_counter(), time.process_time()
        result = naive_trial(cfg) if kind == "naive" else run_trial(cfg)
        print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                          "val_acc": result["val_acc"],
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
              flush=True)


def study(order: list[int], overrides: list[str]) -> dict[str, dict]:
    """The same trials in the same order, naive and ours, each study in its own fresh process;
    trials alternate between the two processes so that both see the same machine load."""
    procs = {kind: subprocess.Popen([sys.executable, "-m", "benchmarks.freeze_speed", "--part", "worker",
                                     "--kind", kind, *overrides], cwd=ROOT, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
             for kind in ("naive", "ours")}
    out = {kind: {"wall_s": 0.0, "cpu_s": 0.0, "val_acc": [], "peak_rss_mb": 0.0} for kind in procs}

    def answer(kind: str) -> dict:
        line = procs[kind].stdout.readline()
        if not line:
            sys.exit(f"benchmark {kind} worker died (exit {procs[kind].wait()})")
        return json.loads(line)

    for kind in procs:
        answer(kind)  # imported and ready
    for i, unfrozen in enumerate(order):
        for kind in (("naive", "ours") if i % 2 == 0 else ("ours", "naive")):
            procs[kind].stdin.write(f"{unfrozen}\n")
            procs[kind].stdin.flush()
            res = answer(kind)
            out[kind]["wall_s"] += res["wall_s"]
            out[kind]["cpu_s"] += res["cpu_s"]
            out[kind]["val_acc"].append(res["val_acc"])
            out[kind]["peak_rss_mb"] = res["peak_rss_mb"]
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return out


def budget_check(overrides: list[str]) -> None:
    """A trial with a cache budget smaller than its features: RAM use stays under it."""
    logging.getLogger().setLevel(logging.WARNING)
    budget_mb = 2.0
    cfg = compose_cfg([*overrides, f"cache.memory_budget_mb={budget_mb}"])
    result = run_trial(cfg)
    feeds_mb = result["cache_bytes"] / 2**20
    print(json.dumps({"budget_mb": budget_mb, "features_mb": feeds_mb,
                      "resident_mb": cache.MEMORY.nbytes / 2**20, "val_acc": result["val_acc"],
                      "mapped_mb": result["cache_mapped_bytes"] / 2**20}))


def _subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.freeze_speed", *args], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark subprocess {args[:2]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--study-trials", type=int, default=None,
                        help="trials in the study (default: every depth 0..N once)")
    parser.add_argument("--study-only", action="store_true", help="skip the table and budget check")
    parser.add_argument("--part", choices=("all", "worker", "budget"), default="all",
                        help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("naive", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part == "worker":
        return worker(args.kind, args.overrides)
    if args.part == "budget":
        return budget_check(args.overrides)

    work = Path(tempfile.mkdtemp(prefix="freeze_speed-", dir=ROOT / "outputs"))
    base = [*args.overrides, f"tracking.uri=sqlite:///{work}/mlflow.db",
            f"tracking.artifact_location={work}/mlartifacts"]
    if args.epochs:
        base.append(f"trainer.epochs={args.epochs}")
    cfg = compose_cfg([*base, f"cache.dir={work}/cache-table"])
    weights.resolve(cfg)  # pretrain the source checkpoint first if needed: not part of any timing
    if not args.study_only:
        depth_table(cfg)
        budget_check_line(base, work)
    study_lines(cfg, args, base, work)


def budget_check_line(base: list[str], work: Path) -> None:
    budget = _subprocess(["--part", "budget", *base, f"cache.dir={work}/cache-budget"])
    print(f"cache budget {budget['budget_mb']:.1f} MB < features {budget['features_mb']:.1f} MB: "
          f"{budget['resident_mb']:.1f} MB kept in RAM, {budget['mapped_mb']:.1f} MB memory-mapped; "
          f"val_acc {budget['val_acc']:.3f}")


def study_lines(cfg: DictConfig, args: argparse.Namespace, base: list[str], work: Path) -> None:
    n = int(cfg.backbone.num_units)
    order = list(range(n + 1))
    random.Random(0).shuffle(order)
    order = order[:args.study_trials] if args.study_trials else order
    print(f"study: {len(order)} trials, unfrozen in this order: {order}", flush=True)
    res = study(order, [*base, f"cache.dir={work}/cache-study"])
    for kind, r in res.items():
        accs = " ".join(f"{a:.3f}" for a in r["val_acc"])
        print(f"study {kind:>5}: {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU (all threads), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, val_acc {accs}")
    print(f"study CPU time ratio (robust to other load): "
          f"{res['naive']['cpu_s'] / res['ours']['cpu_s']:.1f}x")
    print(f"study wall time: naive {res['naive']['wall_s']:.1f} s, ours {res['ours']['wall_s']:.1f} s, "
          f"ratio {res['naive']['wall_s'] / res['ours']['wall_s']:.1f}x")


if __name__ == "__main__":
    main()
