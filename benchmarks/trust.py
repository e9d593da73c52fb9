"""Time to a trustworthy answer: the default study against the grid one writes by hand.

    .venv/bin/python -m benchmarks.trust [--repeats R] [--study-only] [OVERRIDE ...]
    (e.g. paths.pretrained=outputs/pretrained to reuse a source checkpoint already made)

study: ``python -m sweeper.run -m`` on a fresh outputs folder (the source checkpoint is
       pretrained beforehand, for every approach): the whole command's wall time, startup and
       report included; its trials, recommendation and interval.
grid:  what one writes by hand to get an equally firm answer without the sampler: every depth
       the study measured, each with the learning rates the study tried there, on the first
       seed and split; the best rates per depth; then repeats of every depth at its best rates
       on the next seeds and splits until each has R measurements (default: the most the
       study gave any depth). No pruning, no early stop. It runs twice, trial by trial in
       alternation so that other load slows both alike: **naive**, the usual PyTorch recipe
       (benchmarks/freeze_speed.py: a DataLoader with per-sample transforms, the whole model in
       train mode, a full forward every step, torch's default optimizer), and **grid, ours**:
       the same grid through this project's trial path (``run_trial``: the frozen-prefix cache,
       the fused step), which separates what the sampler saves from what a fast trial saves.

The same rule (``sweeper.decision``) turns each into a recommendation, its 95% interval and
whether the answer is settled. OVERRIDEs are Hydra overrides of conf/config.yaml. Not a test.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from benchmarks.freeze_speed import Workers
from sweeper.config import compose
from sweeper.decision import Decision, Measurement, decide
from sweeper.pretrain import resolve_weights
from sweeper.report import make_report
from sweeper.storage import open_storage
from sweeper.tracking import Param

ROOT = Path(__file__).resolve().parent.parent
SETTING = (str(Param.LR_HEAD), str(Param.LR_BACKBONE))


def run_study(base: list[str], folder: Path) -> dict[str, Any]:
    """The default study in a fresh process on a fresh outputs folder: wall time, trials, and
    its answer as the report's rule gives it."""
    cmd = [sys.executable, "-m", "sweeper.run", "-m", *base, f"paths.outputs={folder}",
           "hydra.sweeper.progress=none"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"the study failed:\n{done.stderr[-4000:]}")
    cfg = compose(overrides=[*base, f"paths.outputs={folder}"], return_hydra_config=True)
    study = optuna.load_study(study_name=str(cfg.hydra.sweeper.study_name),
                              storage=open_storage(str(folder / "optuna" / "journal.log")))
    report = make_report(cfg, parent_run=study.user_attrs["mlflow_parent_run_id"],
                         folder=folder / "report-again")
    return {"wall_s": wall, "study": study, "report": report, "settings": cfg.hydra.sweeper,
            "printed": next((x for x in done.stdout.splitlines()
                             if x.startswith("Recommendation:")), "")}


def grid_of(study: optuna.Study, repeats: int | None) -> tuple[dict[int, list[dict]], int]:
    """Per depth, the learning rates the study tried on its first seed and split; and R."""
    settings: dict[int, list[dict]] = defaultdict(list)
    keys: dict[tuple, set] = defaultdict(set)
    for t in study.trials:
        p = t.params
        d = int(p[Param.UNFROZEN])
        setting = {k: p[k] for k in SETTING if k in p}
        if p.get(Param.SEED, 0) == 0 and setting not in settings[d]:
            settings[d].append(setting)
        if t.state == TrialState.COMPLETE:
            keys[(d, tuple(sorted(setting.items())))].add(p.get(Param.SEED, 0))
    most = max((len(v) for v in keys.values()), default=1)
    return dict(sorted(settings.items())), repeats or most


def overrides(depth: int, setting: dict, r: int) -> list[str]:
    return [f"{Param.UNFROZEN}={depth}", *(f"{k}={v!r}" for k, v in setting.items()),
            f"{Param.SEED}={r}", f"{Param.SPLIT_SEED}={r}"]


def run_grid(workers: Workers, grid: dict[int, list[dict]], repeats: int
             ) -> dict[str, list[Measurement]]:
    """The hand-written grid, naive and ours trial by trial; each picks its own best rates."""
    found: dict[str, list[Measurement]] = {"naive": [], "ours": []}
    order = 0

    def record(kind: str, depth: int, setting: dict, r: int, res: dict) -> None:
        found[kind].append(Measurement(depth, tuple(sorted(setting.items())), (r, r),
                                       float(res["val_acc"]), res.get("val_images"), order))

    for depth, settings in grid.items():  # the learning rates, on the first seed and split
        for setting in settings:
            res = workers.trial(overrides(depth, setting, 0))
            for kind in found:
                record(kind, depth, setting, 0, res[kind])
            order += 1
    for depth in grid:  # repeats of each depth at its best rates, by each recipe's own results
        best = {kind: max((m for m in found[kind] if m.arm == depth), key=lambda m: m.val_acc)
                for kind in found}
        for r in range(1, repeats):
            res = workers.trial([], per_kind={k: overrides(depth, dict(best[k].setting), r)
                                              for k in found})
            for kind in found:
                record(kind, depth, dict(best[kind].setting), r, res[kind])
            order += 1
    return found


def line(label: str, trials: int, wall: float, d: Decision) -> str:
    s = d.arms[d.recommended]
    iv = s.interval
    width = (iv.high - iv.low) * 100
    # the study's arms are (strategy, depth); the grid's are depths
    depth = d.recommended[-1] if isinstance(d.recommended, tuple) else d.recommended
    return (f"| {label} | {trials} | {wall:.0f} | {depth} | {iv.mean:.3f} "
            f"({iv.low:.3f}–{iv.high:.3f}) | {width:.1f} | {s.n} | "
            f"{'yes' if d.settled else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="measurements per depth in the grid (default: the most the study "
                             "gave any depth)")
    parser.add_argument("--study-only", action="store_true", help="run the study alone")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    outputs = Path(compose(overrides=args.overrides).paths.outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trust-", dir=outputs))
    # The source checkpoint in the work folder, unless given (paths.pretrained=FOLDER reuses
    # one already made: pretraining is not what is compared).
    given = any(o.startswith("paths.pretrained=") for o in args.overrides)
    base = [*args.overrides, *([] if given else [f"paths.pretrained={work}/pretrained"])]
    cfg = compose(overrides=[*base, f"paths.outputs={work}/pre"])
    resolve_weights(cfg)  # the source checkpoint once, for every approach: not timed
    print(f"{cfg.backbone.name}, {cfg.dataset.name} {cfg.dataset.image_size}px, "
          f"{cfg.trainer.epochs} epochs; work folder {work}", flush=True)

    study = run_study(base, work / "study")
    trials = study["study"].trials
    states = [t.state for t in trials]
    print(f"study: {len(trials)} trials ({states.count(TrialState.PRUNED)} pruned) in "
          f"{study['wall_s']:.1f} s\n{study['printed']}", flush=True)
    rule = {"tolerance": float(study["settings"].tolerance),
            "confidence": float(study["settings"].confidence)}
    if args.study_only:
        return
    grid, repeats = grid_of(study["study"], args.repeats)
    n_grid = sum(len(v) for v in grid.values()) + len(grid) * (repeats - 1)
    print(f"grid: {len(grid)} depths, {sum(len(v) for v in grid.values())} learning-rate "
          f"trials, then {repeats - 1} repeats of every depth = {n_grid} trials, each run "
          "naive and ours", flush=True)
    grid_base = [*base, f"tracking.uri=sqlite:///{work}/grid.db",
                 f"tracking.artifact_location={work}/grid-artifacts", f"cache.dir={work}/cache"]
    workers = Workers(grid_base, argparse.Namespace(naive_data="loader", naive_fused=False,
                                                    naive_workers=0))
    found = run_grid(workers, grid, repeats)
    res = workers.close()
    print()
    print("| approach | trials | wall time (s) | recommended | its val acc (95% CI) "
          "| CI width (points) | repeats | settled |")
    print("|---|---|---|---|---|---|---|---|")
    print(line("naive grid (usual recipe)", n_grid, res["naive"]["wall_s"],
               decide(found["naive"], **rule)))
    print(line("grid, this project's trials", n_grid, res["ours"]["wall_s"],
               decide(found["ours"], **rule)))
    print(line("default study (`python -m sweeper.run -m`)", len(trials), study["wall_s"],
               study["report"].decision))
    print("grid wall times are the sum of their trials (process start-up excluded); the "
          "study's is the whole command (start-up, MLflow, report included).")


if __name__ == "__main__":
    main()
