"""Fixed depths against progressive freezing and gradual unfreezing, on the default trial.

    .venv/bin/python -m benchmarks.strategies [--seeds N] [--only NAME ...] [--tiny] [OVERRIDE ...]
    .venv/bin/python -m benchmarks.strategies --count [OVERRIDE ...]

Every configuration is a whole trial (``sweeper.trial.run_trial``, logged to a throw-away
MLflow store): the same data, pretrained weights, epochs and learning rates (the config's);
seeds 0..N-1 (``trainer.seed``) change the head's initialisation and the batch order. The
trials run seed by seed with the configurations interleaved, so load from other work on a
shared machine slows them alike, and share one fresh cache folder, as a study's trials do
(each is charged the recorded cost of the shared entries it uses, so the order does not
change ``train_time_s``), after one warm-up trial.

Prints one row per configuration: ``train_time_s`` (median over seeds), its ratio to full
fine-tuning's (the median of the per-seed ratios), the training steps alone, the switches of
the trainable units (progressive, gradual), and validation and test accuracy (mean and
standard deviation over seeds). OVERRIDEs are Hydra overrides of conf/config.yaml, applied to
every configuration. ``--tiny``: random weights and FakeData, 3 epochs, one seed (a smoke
test). Not a test.

``--count``: no training; the training compute of each configuration, counted instead of
timed (so it does not depend on the machine's load): the forward and backward FLOPs of one
step of the trainable suffix at every cut (torch's ``FlopCounterMode``), summed over the
schedule's steps, as a share of full fine-tuning's. The optimizer step is not counted.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from sweeper import schedule as sched
from sweeper.config import compose
from sweeper.data import load
from sweeper.model import build
from sweeper.pretrain import resolve_weights
from sweeper.trial import run_trial

TINY = ["backbone.weights=none", "dataset=fake", "trainer.epochs=3", "trainer.batch_size=8",
        "trainer.device=cpu"]


def configurations(num_units: int) -> dict[str, list[str]]:
    """Name -> overrides: fixed depths from the head alone to full fine-tuning, then the
    strategies with their default and a faster schedule."""
    return {
        "depth 0 (head only)": ["freeze.unfrozen=0"],
        "depth 2": ["freeze.unfrozen=2"],
        f"depth {num_units // 2 + 1}": [f"freeze.unfrozen={num_units // 2 + 1}"],
        f"depth {num_units} (full)": [f"freeze.unfrozen={num_units}"],
        "progressive (default)": ["freeze=progressive"],
        "progressive cubic": ["freeze=progressive", "freeze.spacing=cubic"],
        "progressive from 0.25, cubic": ["freeze=progressive", "freeze.start=0.25",
                                         "freeze.spacing=cubic"],
        "gradual (default)": ["freeze=gradual"],
        "gradual 2+1/2 to 4": ["freeze=gradual", "freeze.head_epochs=2", "freeze.every=2",
                               "freeze.unfrozen=4"],
        f"depth {num_units}, layer_decay 0.7": [f"freeze.unfrozen={num_units}",
                                               "optim.layer_decay=0.7"],
    }


def count(overrides: list[str]) -> None:
    """Print each configuration's counted training compute (``--count``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sweeper.train import steps_per_epoch

    cfg = compose(overrides=[*overrides, "backbone.weights=none", "trainer.device=cpu"])
    n, bs, epochs = int(cfg.backbone.num_units), int(cfg.trainer.batch_size), int(cfg.trainer.epochs)
    data = load(cfg.dataset)
    per_epoch = steps_per_epoch(len(data.train), bs)[1]
    model, _ = build(cfg.backbone, len(data.classes), n, None)
    size = int(cfg.dataset.image_size)
    images = torch.randn(bs, 3, size, size)
    flops = {}  # unfrozen -> forward+backward FLOPs of one step
    for unfrozen in range(n + 1):
        model.set_unfrozen(unfrozen)
        model.train()
        x = model.forward_frozen(images)
        with FlopCounterMode(display=False) as counter:
            model.forward_trainable(x).sum().backward()
        flops[unfrozen] = counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    print(f"{cfg.backbone.name} ({n} units), {size}px, batch {bs}, {per_epoch} steps x {epochs} "
          "epochs; GFLOPs of one training step by unfrozen: "
          + ", ".join(f"{u}: {f / 1e9:.2f}" for u, f in flops.items()))
    print("| configuration | GFLOPs (training) | share of full |\n|---|---|---|")
    totals = {}
    for name, extra in configurations(n).items():
        c = compose(overrides=[*overrides, *extra])
        plan = sched.build(c.freeze, c.optim, n, per_epoch, epochs)
        totals[name] = sum(flops[plan.unfrozen(t)] for t in range(plan.steps))
    full = totals[f"depth {n} (full)"]
    for name, total in totals.items():
        print(f"| {name} | {total / 1e9:.0f} | {total / full:.2f} |")


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None,
                        help="names (or the start of names) of the configurations to run")
    parser.add_argument("--tiny", action="store_true", help="a smoke test: random weights, FakeData")
    parser.add_argument("--count", action="store_true",
                        help="count each configuration's training FLOPs instead of timing it")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.count:
        count(args.overrides)
        return
    logging.basicConfig(level=logging.WARNING)
    overrides = [*(TINY if args.tiny else []), *args.overrides]
    seeds = 1 if args.tiny else args.seeds
    outputs = Path(compose(overrides=overrides).paths.outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="strategies-", dir=outputs))
    base = [*overrides, f"tracking.uri=sqlite:///{work}/mlflow.db",
            f"tracking.artifact_location={work}/mlartifacts", f"cache.dir={work}/cache"]
    cfg = compose(overrides=base)
    resolve_weights(cfg)  # pretrain the source checkpoint first if needed: not part of any timing
    # A process's first forward passes build the CPU kernels' primitives (seconds under load):
    # warm up on a cache of its own, or the first fill would record that cost for everyone.
    run_trial(compose(overrides=[*base, f"cache.dir={work}/warm-up", "trainer.epochs=1",
                                 f"freeze.unfrozen={cfg.backbone.num_units}"]))
    n = int(cfg.backbone.num_units)
    configs = configurations(n)
    if args.only:
        configs = {k: v for k, v in configs.items() if any(k.startswith(o) for o in args.only)}
    print(f"{cfg.backbone.name} ({n} units), {cfg.dataset.name} {cfg.dataset.image_size}px, "
          f"{cfg.trainer.epochs} epochs, batch {cfg.trainer.batch_size}, lr_head "
          f"{cfg.optim.lr_head}, lr_backbone {cfg.optim.lr_backbone}, seeds {seeds}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in configs}
    started = time.perf_counter()
    for seed in range(seeds):
        for name, extra in configs.items():
            r = run_trial(compose(overrides=[*base, *extra, f"trainer.seed={seed}"]))
            results[name].append(r)
            print(f"  seed {seed} {name}: train_time_s {r['train_time_s']:.2f}, steps "
                  f"{r['train_steps_s']:.2f}, switches {r['switch_time_s']:.2f}, val_acc "
                  f"{r['val_acc']:.3f}, test_acc {r['test_acc']:.3f}; load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    full = results.get(f"depth {n} (full)")
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average {os.getloadavg()[0]:.1f}\n")
    print("| configuration | train time (s) | vs full | steps (s) | switches (s) | val acc | test acc |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        ratio = (statistics.median(f["train_time_s"] / r["train_time_s"]
                                   for f, r in zip(full, rs, strict=True)) if full else float("nan"))
        print(f"| {name} | {statistics.median(r['train_time_s'] for r in rs):.2f} | {ratio:.2f}x "
              f"| {statistics.median(r['train_steps_s'] for r in rs):.2f} "
              f"| {statistics.median(r['switch_time_s'] for r in rs):.2f} "
              f"| {_mean_sd([r['val_acc'] for r in rs])} | {_mean_sd([r['test_acc'] for r in rs])} |")


if __name__ == "__main__":
    main()
