"""Fixed depths against progressive freezing and gradual unfreezing, on the default trial.

    .venv/bin/python -m benchmarks.strategies [--seeds N] [--only NAME ...] [--tiny] [OVERRIDE ...]

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
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from sweeper.config import compose
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


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None,
                        help="names (or the start of names) of the configurations to run")
    parser.add_argument("--tiny", action="store_true", help="a smoke test: random weights, FakeData")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
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
            print(f"  seed {seed} {name}: train_time_s {r['train_time_s']:.2f}, "
                  f"val_acc {r['val_acc']:.3f}", flush=True)
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
