"""The default study's sampler and pruner, on a simulated objective (no training): the plan
(every depth, a learning-rate search in each, paired repeats), determinism, stopping, pruning."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.config import compose, task_config
from sweeper.decision import REFERENCE, WITHIN
from sweeper.study import DepthPruner, DepthSampler, check_settings, search, settings_in

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
optuna.logging.set_verbosity(optuna.logging.WARNING)

START = {"freeze.unfrozen": 2, "optim.lr_head": 0.05, "optim.lr_backbone": 0.005,
         "trainer.seed": 0, "dataset.split_seed": 0}


def space(high: int = 9):
    """The default study's space (conf/hydra/sweeper), over depths 0..high."""
    cfg = compose(return_hydra_config=True)
    task = task_config(cfg)
    settings = check_settings(settings_in(task, cfg.hydra.sweeper), task,
                              choices=cfg.hydra.runtime.choices, storage=False)
    return search(settings, task, [f"freeze.unfrozen=int(interval(0, {high}))"]).space


def accuracy(depth: int, lr_backbone: float, seed: int) -> float:
    """Rises with depth to 0.95 at depth 5, best at lr_backbone 0.03; each seed/split shifts
    every depth alike, with a little depth-specific noise: a multiple of 1/500."""
    base = 0.95 - 0.012 * max(5 - depth, 0) ** 1.5
    lr = -0.02 * math.log10(lr_backbone / 0.03) ** 2 if depth else 0.0
    split = [0.0, 0.012, -0.008, 0.004, -0.006, 0.01, -0.002, 0.006][seed % 8]
    noise = ((depth * 7 + seed * 3) % 5 - 2) * 0.001
    return round((base + lr + split + noise) * 500) / 500


def run_study(n_trials: int, high: int = 9, times=None, **kw):
    """Ask, suggest, report per epoch and tell, as the sweep and its jobs do."""
    sp = space(high)
    sampler = DepthSampler(sp.sampled, START, **kw)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=DepthPruner())
    study.set_metric_names(["val_acc"])
    while len(study.trials) < n_trials and not sampler.done(study):
        trial = study.ask()
        p = dict(o.split("=", 1) for o in sp.suggest(trial, START.get))
        depth, seed = int(p["freeze.unfrozen"]), int(p["trainer.seed"])
        final = accuracy(depth, float(p.get("optim.lr_backbone", 0.005)), seed)
        pruned = False
        for epoch in range(1, 11):
            trial.report(final - 0.3 * math.exp(-epoch), epoch)
            if trial.should_prune():
                pruned = True
                break
        if pruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        trial.set_user_attr("val_images", 500)
        trial.set_user_attr("train_time_s", next(times) if times else 1.0)
        study.tell(trial, final)
    return study, sampler


def params(study):
    return [dict(t.params) for t in study.trials]


def test_every_depth_then_a_learning_rate_search_then_paired_repeats():
    study, sampler = run_study(30)
    ps = params(study)
    # round 1: every depth once, at the config's learning rates, on the config's seed and split
    assert [p["freeze.unfrozen"] for p in ps[:10]] == [0, 9, 4, 2, 6, 1, 3, 5, 7, 8]  # spread
    assert all(p["optim.lr_head"] == 0.05 and p["trainer.seed"] == 0 and p["dataset.split_seed"] == 0
               for p in ps[:10])
    assert all(("optim.lr_backbone" in p) == (p["freeze.unfrozen"] > 0) for p in ps)
    # round 2: every depth again with other learning rates, same seed and split
    assert sorted(p["freeze.unfrozen"] for p in ps[10:20]) == list(range(10))
    assert all(p["trainer.seed"] == 0 and p["optim.lr_head"] != 0.05 or
               p.get("optim.lr_backbone") != 0.005 for p in ps[10:20])
    # then repeats: the next seed and split together, at the depth's chosen setting
    repeats = [(t, p) for t, p in zip(study.trials[20:], ps[20:], strict=True)]
    assert repeats and all(p["trainer.seed"] == p["dataset.split_seed"] >= 1 for _, p in repeats)
    decision = sampler.decision(study)
    for t, p in repeats:
        chosen = decision.arms[p["freeze.unfrozen"]].setting
        assert tuple(sorted((k, v) for k, v in p.items()
                            if k.startswith("optim."))) == chosen, t.number
    # paired: a repeated depth is compared with the reference on the keys both ran
    ref = decision.arms[decision.reference]
    for s in decision.arms.values():
        if s.n >= 2 and s is not ref:
            assert s.diff.kind == "paired", s
    assert ref.n >= 3  # min_repeats
    assert all(t.user_attrs.get("plan") for t in study.trials)  # each trial says why


def test_same_results_give_the_same_trials_whatever_the_measured_times():
    a, _ = run_study(30, times=iter([0.1 * i for i in range(100)]))
    b, _ = run_study(30, times=iter([9.0 - 0.1 * i for i in range(100)]))
    assert params(a) == params(b)
    assert [t.state for t in a.trials] == [t.state for t in b.trials]


def test_stops_once_settled_with_the_cheapest_depth_within_tolerance():
    study, sampler = run_study(80)
    decision = sampler.decision(study)
    assert len(study.trials) < 80 and decision.settled
    # depth 4 is 1.2 points below depth 5 in truth, depth 5 the best: 5 within, 0-4 worse
    assert decision.recommended == 5, {a: (s.status, s.mean) for a, s in decision.arms.items()}
    assert decision.arms[5].status in (WITHIN, REFERENCE) and decision.arms[5].n >= 3
    assert all(decision.arms[d].status == "worse" for d in range(5))


def test_the_pruner_stops_a_search_trial_behind_its_depth_but_never_a_repeat():
    study = optuna.create_study(direction="maximize", pruner=DepthPruner(margin=3, n_warmup_steps=2))
    dists = space().sampled

    def add(depth, lr, seed, curve, state=TrialState.COMPLETE):
        p = {"freeze.unfrozen": depth, "optim.lr_head": lr, "trainer.seed": seed,
             "dataset.split_seed": seed}
        t = optuna.trial.create_trial(params=p, distributions={k: dists[k] for k in p},
                                      intermediate_values=dict(enumerate(curve, 1)),
                                      value=curve[-1] if state == TrialState.COMPLETE else None,
                                      state=state)
        study.add_trial(t)
        return study.trials[-1]

    add(3, 0.05, 0, [0.5, 0.8, 0.9, 0.92])
    pruner = study.pruner
    behind = add(3, 0.2, 0, [0.5, 0.7, 0.85], TrialState.RUNNING)      # 5 points behind at 3
    early = add(3, 0.2, 0, [0.5, 0.6], TrialState.RUNNING)             # within the warm-up
    close = add(3, 0.2, 0, [0.5, 0.8, 0.88], TrialState.RUNNING)       # 2 points: not clearly
    repeat = add(3, 0.05, 1, [0.5, 0.7, 0.8], TrialState.RUNNING)      # another key: a repeat
    other = add(4, 0.05, 0, [0.5, 0.7, 0.8], TrialState.RUNNING)       # another depth
    assert pruner.prune(study, behind)
    assert not any(pruner.prune(study, t) for t in (early, close, repeat, other))


def test_parallel_asks_take_different_trials():
    sp = space()
    sampler = DepthSampler(sp.sampled, START)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    asked = []
    for _ in range(4):  # four workers ask before any trial ends
        t = study.ask()
        sp.suggest(t, START.get)
        asked.append((t.params["freeze.unfrozen"], t.params["trainer.seed"]))
    assert len(set(asked)) == 4


def test_a_deep_backbone_starts_from_an_even_subset_and_refines_near_the_answer():
    study, sampler = run_study(60, high=40, max_depths=6)
    first = sorted(p["freeze.unfrozen"] for p in params(study)[:6])
    assert first == [0, 8, 16, 24, 32, 40]
    measured = {p["freeze.unfrozen"] for p in params(study)}
    refined = measured - set(first)
    # the answer (depth 5 in truth) lies between 0 and 8: the refinement bisects there
    assert refined and all(0 < d < 8 for d in refined)
    assert sampler.budget(60).startswith("n_trials=60: 6 depths (an evenly spread 6 of 41")
