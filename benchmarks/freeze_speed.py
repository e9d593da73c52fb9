"""Naive freezing against this project's trial path, side by side, on the default trial.

    .venv/bin/python -m benchmarks.freeze_speed [--epochs N] [--seeds N] [--study default|every-depth|none]
                                                [--naive-data loader|tensors] [--naive-fused]
                                                [--naive-workers N] [--overhead-only] [OVERRIDE ...]

naive: the usual PyTorch recipe -- a ``DataLoader`` over a dataset that transforms one image
at a time, ``requires_grad=False`` on the frozen units, the whole model in train mode, a full
forward every step, torch's default optimizer implementation over the trainable parameters;
on a GPU also what the usual GPU recipe adds: pinned memory, bf16 autocast as
``trainer.amp`` says, and channels_last (the same layout as ours).
ours:  ``sweeper.train.fit`` fed by the frozen-prefix cache (``sweeper.feeds``), with the
batched data path and the fused optimizer step of ``conf/optim``.

Same images, epochs, batch size, seeds, optimizer and hyperparameters. Prints, per depth
unfrozen in {N, N//2, 2, 0} (N = freeze units), the median epoch time of each, their ratio and
the validation accuracies (mean over ``--seeds``; also ours with ``freeze.bn_stats=target``);
then a cache-budget check and the wall time of the same study both ways: by default the
trials of ``python -m sweeper.run -m`` (its sampler, told ours' results; naive replays the same
trials), or every depth once; each study in a fresh process with a cold cache. Last, the
default study itself (``python -m sweeper.run -m`` in a fresh outputs folder, reusing the
pretrained checkpoint): its wall and CPU time and its overhead per trial, the time its trials
spend outside their training steps and per-epoch validation (``overhead_per_trial_s`` of its
parent run, :mod:`sweeper.timing`; ``--overhead-only`` runs just that). Naive and ours
alternate (epoch by epoch in the table, trial by trial in the study), so a machine shared with
other work slows both alike: the ratios are what to compare. ``--naive-data tensors`` and
``--naive-fused`` give naive this project's data path and optimizer step, leaving the cache as
the only difference. OVERRIDEs are Hydra overrides of conf/config.yaml (e.g.
``backbone=resnet50``). Not a test.
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

import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from sweeper import data as data_mod
from sweeper import feeds, timing
from sweeper.config import compose, resolved, task_config
from sweeper.device import as_input, autocast, place_model, resolve_device
from sweeper.model import FreezeNet, build
from sweeper.pretrain import resolve_weights
from sweeper.schedule import depth_schedule
from sweeper.study import check_settings, make_sampler, search, settings_in
from sweeper.tracking import Param, Tag, Tracker
from sweeper.train import fit, make_optimizer, peak_memory_mb, reset_peak_memory, set_learning_rates
from sweeper.trial import adapt_batchnorm, log_inputs, run_trial, seed_everything

ROOT = Path(__file__).resolve().parent.parent


# --- naive ---------------------------------------------------------------------------------

class UsualDataset(torch.utils.data.Dataset):
    """What a torchvision dataset hands a ``DataLoader``: one image at a time, transformed per
    sample (to float, grey to 3 channels, normalised). The images are the trial's own (already
    resized), so both recipes see the same pixels."""

    def __init__(self, split: data_mod.Split, normalize: data_mod.Normalize) -> None:
        self.split = split
        steps: list = [v2.ToDtype(torch.float32, scale=True)]
        mean, std = normalize.mean.flatten().tolist(), normalize.std.flatten().tolist()
        if split.images.shape[1] == 1:
            steps.append(v2.Grayscale(num_output_channels=3))
            mean, std = mean * 3 if len(mean) == 1 else mean, std * 3 if len(std) == 1 else std
        self.transform = v2.Compose([*steps, v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.split.images[i]), int(self.split.labels[i])


class NaiveBatches:
    """One split's batches of (normalised images, labels) on ``device``, every time it is
    iterated: shuffled with ``gen``, else in order.

    ``loader``: a ``DataLoader`` over :class:`UsualDataset` (the usual recipe), made once, with
    ``workers`` worker processes kept alive between epochs (0 on 2 CPU cores, where they would
    only compete with the model) and pinned memory on a GPU.
    ``tensors``: this project's batched path (index the uint8 tensor, normalise the batch).
    """

    def __init__(self, split: data_mod.Split, normalize: data_mod.Normalize, bs: int,
                 device: torch.device, data_path: str, gen: torch.Generator | None = None,
                 workers: int = 0) -> None:
        self.split, self.bs, self.device, self.gen = split, bs, device, gen
        n = len(split)
        self.drop_last = gen is not None and n % bs == 1 and n > 1  # as sweeper.train: no batch of one
        self.loader = None
        if data_path == "loader":
            self.loader = DataLoader(UsualDataset(split, normalize), batch_size=bs,
                                     shuffle=gen is not None, generator=gen, drop_last=self.drop_last,
                                     num_workers=workers, persistent_workers=workers > 0,
                                     pin_memory=device.type == "cuda")
        self.norm = normalize.to(device)

    def __iter__(self):
        if self.loader is not None:
            for x, y in self.loader:
                yield (as_input(x.to(self.device, non_blocking=True)),
                       y.to(self.device, non_blocking=True))
            return
        n = len(self.split)
        order = torch.randperm(n, generator=self.gen) if self.gen is not None else torch.arange(n)
        order = order[:n - 1] if self.drop_last else order
        for start in range(0, len(order), self.bs):
            idx = order[start:start + self.bs]
            yield (as_input(self.norm(self.split.images[idx].to(self.device))),
                   self.split.labels[idx].to(self.device))


def naive_optimizer(net: FreezeNet, cfg: DictConfig, steps_per_epoch: int, fused: bool):
    """The same optimizer, hyperparameters and learning-rate schedule over the trainable
    parameters; in torch's default implementation unless ``fused`` (the usual recipe never
    asks for it)."""
    optim = OmegaConf.merge(cfg.optim, {"optimizer": {"fused": True if fused else None}})
    plan = depth_schedule(net.num_units, net.unfrozen, optim, steps_per_epoch,
                          int(cfg.trainer.epochs))
    return make_optimizer(net, optim), plan


def naive_epochs(net: FreezeNet, data: data_mod.Data, cfg: DictConfig, device: torch.device,
                 opts: argparse.Namespace):
    """The usual recipe, one epoch per ``next()``: yields (training time s, val accuracy)."""
    model = nn.Sequential(*net.units, net.head)  # plain train(): frozen BN moves too
    place_model(model, device)
    bs, n = int(cfg.trainer.batch_size), len(data.train)
    n_used = n - 1 if n % bs == 1 and n > 1 else n
    opt, plan = naive_optimizer(net, cfg, math.ceil(n_used / bs), opts.naive_fused)
    gen = torch.Generator().manual_seed(int(cfg.trainer.seed))
    train = NaiveBatches(data.train, data.normalize, bs, device, opts.naive_data, gen, opts.naive_workers)
    val = NaiveBatches(data.val, data.normalize, bs * 4, device, opts.naive_data, None, opts.naive_workers)
    amp = bool(cfg.trainer.amp)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for _ in range(int(cfg.trainer.epochs)):
        model.train()
        with timing.measure(device) as steps:
            for x, y in train:
                set_learning_rates(opt, plan, step)
                with autocast(device, amp):
                    loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        yield steps.s, naive_accuracy(model, val, len(data.val), device, amp)


@torch.no_grad()
def naive_accuracy(model: nn.Module, batches: NaiveBatches, n: int, device: torch.device,
                   amp: bool) -> float:
    model.eval()
    correct = 0
    for x, y in batches:
        with autocast(device, amp):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / n


def naive_trial(cfg: DictConfig, opts: argparse.Namespace) -> dict:
    """``run_trial``'s steps (data, weights, model, MLflow run) with the naive training recipe."""
    device = resolve_device(str(cfg.trainer.device))
    run = Tracker(cfg.tracking).start(f"naive-unfrozen{cfg.freeze.unfrozen}",
                                      tags={Tag.KIND: "benchmark-naive"})
    log_inputs(run, resolved(cfg), [], None)  # the same MLflow writes as run_trial
    seed_everything(cfg.trainer, device)
    reset_peak_memory(device)
    data = data_mod.load(cfg.dataset)
    state, origin = resolve_weights(cfg)
    torch.manual_seed(int(cfg.trainer.seed))
    net, _ = build(cfg.backbone, len(data.classes), int(cfg.freeze.unfrozen), state, origin)
    times, val_acc = [], 0.0
    for epoch, (t, val_acc) in enumerate(naive_epochs(net, data, cfg, device, opts), 1):
        times.append(t)
        run.metrics({"epoch_time_s": t, "val_acc": val_acc}, step=epoch)
    model = nn.Sequential(*net.units, net.head)
    test = NaiveBatches(data.test, data.normalize, int(cfg.trainer.batch_size) * 4, device,
                        opts.naive_data, None, opts.naive_workers)
    test_acc = naive_accuracy(model, test, len(data.test), device, bool(cfg.trainer.amp))
    peak_mb = peak_memory_mb(device)
    run.metrics({"val_acc": val_acc, "test_acc": test_acc, "train_time_s": sum(times),
                 "peak_memory_mb": peak_mb})
    run.end()
    return {"val_acc": val_acc, "test_acc": test_acc, "train_time_s": sum(times),
            "peak_memory_mb": peak_mb, "val_images": len(data.val)}


# --- ours ----------------------------------------------------------------------------------

def ours_net(cfg: DictConfig, data: data_mod.Data, state, origin: str, unfrozen: int,
             device: torch.device, bn_stats: str = "source") -> FreezeNet:
    """The trial's model (same seed, so the same head as naive's), with its frozen BatchNorm
    statistics re-estimated when ``bn_stats=target``."""
    torch.manual_seed(int(cfg.trainer.seed))
    net = place_model(build(cfg.backbone, len(data.classes), unfrozen, state, origin)[0], device)
    adapt_batchnorm(net, data, bn_stats, device, int(cfg.trainer.batch_size))
    return net


def ours_fit(net: FreezeNet, data: data_mod.Data, cfg: DictConfig, device: torch.device, on_epoch):
    fed = feeds.for_trial(net, data, cfg.cache, data_mod.augment(cfg.get("augment")), device,
                          bool(cfg.trainer.amp))
    result = fit(net, data, cfg.trainer, cfg.optim, device, on_epoch=on_epoch, feeds=fed)
    return [e.epoch_time_s for e in result.epochs], result.val_acc, fed


# --- the parts -----------------------------------------------------------------------------

def depth_table(cfg: DictConfig, opts: argparse.Namespace) -> None:
    device = resolve_device(str(cfg.trainer.device))
    n = int(cfg.backbone.num_units)
    seeds = [int(cfg.trainer.seed) + i for i in range(opts.seeds)]
    # The seed is the trainer's: data splits and pretrained weights are the same for every one.
    cfgs = {seed: compose(overrides=[*opts.base, f"trainer.seed={seed}",
                                     f"cache.dir={opts.work}/cache-table"])
            for seed in seeds}
    data = data_mod.load(cfg.dataset)
    state, origin = resolve_weights(cfg)
    print(f"{cfg.backbone.name}, {n} freeze units, {cfg.dataset.name} {cfg.dataset.image_size}px, "
          f"{len(data.train)} train / {len(data.val)} val images, {cfg.trainer.epochs} epochs, "
          f"batch {cfg.trainer.batch_size}, {device.type} x{torch.get_num_threads()} threads, "
          f"cache dtype {cfg.cache.dtype}; seeds {seeds}")
    print(f"naive: data {opts.naive_data}, optimizer {'fused' if opts.naive_fused else 'torch default'}; "
          f"ours: cache, batched data, fused optimizer")
    head = (f"{'unfrozen':>8} {'frozen':>6} | {'naive s/ep':>10} {'ours s/ep':>9} {'ratio':>7} | "
            f"{'naive val':>9} {'ours val':>8} {'ours+bn':>8} | {'fill s (once)':>13}")
    print(head)
    print("-" * len(head))
    for unfrozen in (n, n // 2, 2, 0):
        naive_times, ours_times, ratios, accs = [], [], [], {"naive": [], "ours": [], "ours+bn": []}
        fill = 0.0
        for seed in seeds:
            c = cfgs[seed]
            seed_everything(c.trainer, device)
            net_naive = ours_net(c, data, state, origin, unfrozen, device)
            net_ours = ours_net(c, data, state, origin, unfrozen, device)
            # Lockstep: one naive epoch after each of ours, so both see the same machine load.
            naive = naive_epochs(net_naive, data, c, device, opts)
            naive_runs = []
            times, acc, fed = ours_fit(net_ours, data, c, device,
                                         on_epoch=lambda _s, g=naive, r=naive_runs: r.append(next(g)))
            naive_times += [t for t, _ in naive_runs]
            ours_times += times
            ratios += [tn / to for (tn, _), to in zip(naive_runs, times, strict=True)]
            accs["naive"].append(naive_runs[-1][1])
            accs["ours"].append(acc)
            fill = fed.train.fill_time_s
            # Accuracy only: the same trial with freeze.bn_stats=target (AdaBN)
            net_bn = ours_net(c, data, state, origin, unfrozen, device, "target")
            accs["ours+bn"].append(ours_fit(net_bn, data, c, device, on_epoch=None)[1])
        mean = {k: statistics.fmean(v) for k, v in accs.items()}
        print(f"{unfrozen:>8} {n - unfrozen:>6} | {statistics.median(naive_times):>10.3f} "
              f"{statistics.median(ours_times):>9.4f} {statistics.median(ratios):>6.1f}x | "
              f"{mean['naive']:>9.3f} {mean['ours']:>8.3f} {mean['ours+bn']:>8.3f} | {fill:>13.2f}",
              flush=True)
    print("ratio: median over epochs of naive epoch time / ours (epochs run alternately); "
          f"val: mean over {len(seeds)} seed(s); ours+bn: ours with freeze.bn_stats=target")


def worker(kind: str, overrides: list[str], opts: argparse.Namespace) -> None:
    """Run one trial per JSON list of overrides read from stdin; answer each with a JSON line."""
    logging.getLogger().setLevel(logging.WARNING)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        cfg = compose(overrides=[*overrides, *json.loads(line)])
        t0, c0 = time.perf_counter(), time.process_time()
        parts = timing.TrialTime()
        result = naive_trial(cfg, opts) if kind == "naive" else run_trial(cfg, time=parts)
        print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                          "val_acc": result["val_acc"], "train_time_s": result["train_time_s"],
                          "test_acc": result["test_acc"], "val_images": result.get("val_images"),
                          "train_steps_s": result.get("train_steps_s", result["train_time_s"]),
                          "peak_memory_mb": result["peak_memory_mb"],
                          # ours: where the rest of its wall time went (naive: zeros)
                          "val_s": sum(parts.eval_s), "filled_s": parts.filled_s,
                          "copy_s": parts.train_copy_s + parts.val_copy_s,
                          "bn_s": parts.bn_stats_s or 0.0,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
              flush=True)


# The parts of ours' wall time other than its training steps that a trial measures.
PARTS = {"val_s": "per-epoch validation", "filled_s": "cache fills", "copy_s": "rows to the GPU",
         "bn_s": "BatchNorm re-estimation"}


class Workers:
    """A naive and an ours process, each a fresh interpreter with a cold cache, that run the
    trials they are sent; trials alternate between the two so both see the same machine load."""

    def __init__(self, overrides: list[str], opts: argparse.Namespace) -> None:
        flags = [f"--naive-data={opts.naive_data}", f"--naive-workers={opts.naive_workers}",
                 *(["--naive-fused"] if opts.naive_fused else [])]
        self.procs = {kind: subprocess.Popen(
            [sys.executable, "-m", "benchmarks.freeze_speed", "--part", "worker", "--kind", kind,
             *flags, *overrides], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for kind in ("naive", "ours")}
        self.out = {kind: {"wall_s": 0.0, "cpu_s": 0.0, "steps_s": 0.0, "val_acc": [], "peak_rss_mb": 0.0,
                           "peak_memory_mb": 0.0, **dict.fromkeys(PARTS, 0.0)}
                    for kind in self.procs}
        for kind in self.procs:
            self._answer(kind)  # imported and ready
        self.count = 0

    def _answer(self, kind: str) -> dict:
        line = self.procs[kind].stdout.readline()
        if not line:
            sys.exit(f"benchmark {kind} worker died (exit {self.procs[kind].wait()})")
        return json.loads(line)

    def trial(self, overrides: list[str], per_kind: dict[str, list[str]] | None = None
              ) -> dict[str, dict]:
        """Run a trial in both processes (``per_kind``: other overrides for one of them)."""
        results = {}
        kinds = ("naive", "ours") if self.count % 2 == 0 else ("ours", "naive")
        self.count += 1
        for kind in kinds:
            mine = (per_kind or {}).get(kind, overrides)
            self.procs[kind].stdin.write(json.dumps(mine) + "\n")
            self.procs[kind].stdin.flush()
            res = results[kind] = self._answer(kind)
            self.out[kind]["wall_s"] += res["wall_s"]
            self.out[kind]["cpu_s"] += res["cpu_s"]
            self.out[kind]["steps_s"] += res["train_steps_s"]
            for part in PARTS:
                self.out[kind][part] += res[part]
            self.out[kind]["val_acc"].append(res["val_acc"])
            self.out[kind]["peak_rss_mb"] = res["peak_rss_mb"]
            self.out[kind]["peak_memory_mb"] = max(self.out[kind]["peak_memory_mb"], res["peak_memory_mb"])
        shown = overrides if not per_kind else [
            f"{k}: {' '.join(v)}" for k, v in per_kind.items()]
        print(f"  trial {self.count - 1:>2}: naive {results['naive']['wall_s']:6.1f} s, "
              f"ours {results['ours']['wall_s']:6.1f} s, val {results['naive']['val_acc']:.3f} / "
              f"{results['ours']['val_acc']:.3f} (ours: {results['ours']['train_steps_s']:.1f} s steps, "
              f"{results['ours']['filled_s']:.1f} s fills)  {' '.join(shown)}", flush=True)
        return results

    def close(self) -> dict[str, dict]:
        for proc in self.procs.values():
            proc.stdin.close()
            proc.wait()
        return self.out


def default_study(workers: Workers, base: list[str], n_trials: int | None) -> list[list[str]]:
    """The study ``python -m sweeper.run -m`` runs (its search space, conditions, sampler and
    objectives from conf/hydra/sweeper), asked and told here; ours' results are told to the
    sampler and naive runs the very same trials (to the end: no pruning in this replay).
    Returns the trials' overrides."""
    full = compose(overrides=base, return_hydra_config=True)
    task = task_config(full)
    settings = check_settings(settings_in(task, full.hydra.sweeper), task,
                              choices=full.hydra.runtime.choices)
    found = search(settings, task)
    objectives = {str(k): str(v) for k, v in settings.objectives.items()}
    study = optuna.create_study(directions=list(objectives.values()),
                                sampler=make_sampler(settings.get("sampler"), search=found))
    study.set_metric_names(list(objectives))
    done = getattr(study.sampler, "done", None)  # the depth sampler stops once settled
    trials = []
    for _ in range(n_trials or found.n_trials):
        if done is not None and done(study):
            break
        trial = study.ask()
        overrides = found.space.suggest(trial, lambda key: OmegaConf.select(task, key))
        trials.append(overrides)
        ours = workers.trial(overrides)["ours"]
        trial.set_user_attr("val_images", ours["val_images"])
        study.tell(trial, [ours[name] for name in objectives])
    return trials


def every_depth(workers: Workers, depths: list[int], n_trials: int | None) -> list[list[str]]:
    """Every one of ``depths`` once, in a fixed shuffled order, the config's learning rates."""
    order = list(depths)
    random.Random(0).shuffle(order)
    trials = [[f"freeze.unfrozen={u}"] for u in order[:n_trials or len(order)]]
    for overrides in trials:
        workers.trial(overrides)
    return trials


def budget_check(overrides: list[str]) -> None:
    """A trial with a cache budget smaller than its features: RAM use stays under it."""
    logging.getLogger().setLevel(logging.WARNING)
    budget_mb = 2.0
    cfg = compose(overrides=[*overrides, f"cache.memory_budget_mb={budget_mb}"])
    result = run_trial(cfg)
    feeds_mb = result["cache_bytes"] / 2**20
    print(json.dumps({"budget_mb": budget_mb, "features_mb": feeds_mb,
                      "resident_mb": feeds.MEMORY.nbytes / 2**20, "val_acc": result["val_acc"],
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
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds per depth in the table (accuracies are their mean)")
    parser.add_argument("--study", choices=("default", "every-depth", "none"), default="default",
                        help="default: the trials of `python -m sweeper.run -m`'s study; "
                             "every-depth: unfrozen 0..N once each; none: skip the study")
    parser.add_argument("--study-trials", type=int, default=None,
                        help="trials in the study (default: the study's n_trials, or N+1)")
    parser.add_argument("--study-only", action="store_true", help="skip the table and budget check")
    parser.add_argument("--naive-data", choices=("loader", "tensors"), default="loader",
                        help="loader: DataLoader with per-sample transforms (the usual recipe); "
                             "tensors: this project's batched data path")
    parser.add_argument("--naive-fused", action="store_true",
                        help="give naive the fused optimizer step too")
    parser.add_argument("--naive-workers", type=int, default=0,
                        help="DataLoader worker processes of naive's loader (0: load in the main "
                             "process, right on 2 CPU cores)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the default study's overhead per trial (python -m sweeper.run -m)")
    parser.add_argument("--part", choices=("all", "worker", "budget"), default="all",
                        help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("naive", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part == "worker":
        return worker(args.kind, args.overrides, args)
    if args.part == "budget":
        return budget_check(args.overrides)

    outputs = Path(compose(overrides=args.overrides).paths.outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    args.work = work = Path(tempfile.mkdtemp(prefix="freeze_speed-", dir=outputs))
    args.base = base = [*args.overrides, f"tracking.uri=sqlite:///{work}/mlflow.db",
                        f"tracking.artifact_location={work}/mlartifacts"]
    if args.epochs:
        base.append(f"trainer.epochs={args.epochs}")
    cfg = compose(overrides=[*base, f"cache.dir={work}/cache-table"])
    resolve_weights(cfg)  # pretrain the source checkpoint first if needed: not part of any timing
    if args.overhead_only:
        return overhead_line(cfg, args, work)
    if not args.study_only:
        depth_table(cfg, args)
        budget_check_line(base, work)
    if args.study != "none":
        study_lines(cfg, args, base, work)
        overhead_line(cfg, args, work)


def budget_check_line(base: list[str], work: Path) -> None:
    budget = _subprocess(["--part", "budget", *base, f"cache.dir={work}/cache-budget"])
    print(f"cache budget {budget['budget_mb']:.1f} MB < features {budget['features_mb']:.1f} MB: "
          f"{budget['resident_mb']:.1f} MB kept in RAM, {budget['mapped_mb']:.1f} MB memory-mapped; "
          f"val_acc {budget['val_acc']:.3f}")


def study_lines(cfg: DictConfig, args: argparse.Namespace, base: list[str], work: Path,
                depths: list[int] | None = None) -> dict[str, dict]:
    """Run the study both ways (``args.study``: default, or every one of ``depths``, by default
    0..N), print its lines, and return each recipe's totals (:meth:`Workers.close`)."""
    study_base = [*base, f"cache.dir={work}/cache-study"]
    workers = Workers(study_base, args)
    if args.study == "default":
        print("study: the default study's trials (sampled for ours, replayed by naive)", flush=True)
        trials = default_study(workers, study_base, args.study_trials)
    else:
        depths = list(range(int(cfg.backbone.num_units) + 1)) if depths is None else depths
        print(f"study: every depth of {sorted(depths)} once", flush=True)
        trials = every_depth(workers, depths, args.study_trials)
    res = workers.close()
    depths = [int(o.split("=")[1]) for t in trials for o in t if o.startswith(f"{Param.UNFROZEN}=")]
    print(f"study: {len(trials)} trials, unfrozen in this order: {depths}")
    for kind, r in res.items():
        accs = " ".join(f"{a:.3f}" for a in r["val_acc"])
        print(f"study {kind:>5}: {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU (all threads), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, best val_acc {max(r['val_acc']):.3f}; val_acc {accs}")
    print(f"study CPU time ratio (robust to other load): "
          f"{res['naive']['cpu_s'] / res['ours']['cpu_s']:.1f}x")
    print(f"study bound: ours spent {res['ours']['steps_s']:.1f} s in training steps of its trainable "
          f"units, work naive does too: no cache can beat naive {res['naive']['wall_s']:.1f} s / "
          f"{res['ours']['steps_s']:.1f} s = {res['naive']['wall_s'] / res['ours']['steps_s']:.1f}x here")
    ours = res["ours"]
    other = ours["wall_s"] - ours["steps_s"] - sum(ours[part] for part in PARTS)
    print(f"study ours' wall time: {ours['steps_s']:.1f} s training steps, "
          + ", ".join(f"{ours[part]:.1f} s {what}" for part, what in PARTS.items())
          + f", {other:.1f} s the rest (building, test evaluation, logging, warm-up)")
    print(f"study wall time: naive {res['naive']['wall_s']:.1f} s, ours {res['ours']['wall_s']:.1f} s, "
          f"ratio {res['naive']['wall_s'] / res['ours']['wall_s']:.1f}x")
    return res


def overhead_line(cfg: DictConfig, args: argparse.Namespace, work: Path) -> None:
    """The default study as a user runs it (``python -m sweeper.run -m``), in a fresh outputs
    folder with a cold cache but the already pretrained checkpoint: its wall and CPU time, and
    the overhead per trial its parent run records."""
    from mlflow.tracking import MlflowClient

    out = work / "default-study"
    extra = [f"trainer.epochs={args.epochs}"] if args.epochs else []
    cmd = [sys.executable, "-m", "sweeper.run", "-m", "hydra.sweeper.progress=log", *args.overrides,
           *extra, f"paths.outputs={out}", f"tracking.uri=sqlite:///{out}/mlflow.db",
           f"paths.pretrained={Path(cfg.paths.pretrained).resolve()}",
           f"paths.data={Path(cfg.paths.data).resolve()}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode != 0:
        sys.exit(f"the default study failed:\n{done.stderr[-4000:]}")
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name(str(cfg.tracking.experiment))
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`{Tag.KIND}` = 'study'")
    m = parent.data.metrics
    n = int(m["n_trials_complete"] + m["n_trials_pruned"] + m["n_trials_failed"])
    per_trial, tested = m["overhead_per_trial_s"], m["test_eval_time_s"]
    print(f"default study (python -m sweeper.run -m, fresh outputs, checkpoint pretrained): "
          f"{wall:.1f} s wall, {cpu:.1f} s CPU, {n} trials")
    print(f"overhead per trial: {per_trial:.3f} s (outside training steps and per-epoch "
          f"validation: {per_trial - tested / n:.3f} s in the trials, {tested / n:.3f} s of the "
          f"{tested:.1f} s end-of-study test evaluation); target <= 0.25 s")


if __name__ == "__main__":
    main()
