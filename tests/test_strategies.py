"""Freezing over time: progressive freezing, gradual unfreezing and layer-wise decay keep what
frozen means at every step, move the optimizer and the cache with the cut, and are logged,
charged and re-run like a fixed depth."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from sweeper import data as data_mod
from sweeper import feeds as cache
from sweeper import schedule as sched
from sweeper import timing, train
from sweeper.errors import UserError
from sweeper.model import build
from sweeper.rerun import rerun
from sweeper.tracking import State
from sweeper.trial import run_trial

OPTIM = OmegaConf.create({"lr_head": 0.1, "lr_backbone": 0.05, "weight_decay": 0.0,
                          "layer_decay": 1.0, "schedule": "cosine",
                          "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True,
                                        "momentum": 0.9, "fused": True}})


def _freeze(strategy: str, **kw):
    base = {"depth": {"unfrozen": 2},
            "progressive": {"unfrozen": 9, "start": 0.5, "end": 1.0, "spacing": "linear"},
            "gradual": {"unfrozen": 9, "head_epochs": 1, "every": 1, "units_each": 1,
                        "new_lr_scale": 1.0}}[strategy]
    return OmegaConf.create({"strategy": strategy, **base, **kw})


def _trainable_is_a_suffix(s: sched.Schedule) -> None:
    for step in range(s.steps):
        n = s.unfrozen(step)
        assert [s.on[i] <= step < s.off[i] for i in range(s.num_units)] == \
            [i >= s.num_units - n for i in range(s.num_units)]


# --- schedules: which units train at each step --------------------------------------------

def test_progressive_freezes_front_to_back_from_start_to_end():
    s = sched.build(_freeze("progressive"), OPTIM, 9, steps_per_epoch=8, epochs=10)
    _trainable_is_a_suffix(s)
    assert s.unfrozen(0) == s.unfrozen(39) == 9  # all train for the first half
    assert s.unfrozen(40) == 8  # the stem freezes at start=0.5
    assert [s.unfrozen(t) for t in (45, 50, 75, 79)] == [7, 6, 1, 1]
    assert s.off[8] == s.steps  # the top unit trains to the end (end=1.0), with the head
    assert s.lowest_cut() == 0
    # cubic: the first unit at start, the last at end, those between sooner than linear
    c = sched.build(_freeze("progressive", spacing="cubic"), OPTIM, 9, 8, 10)
    assert c.off[0] == s.off[0] and c.off[8] == s.off[8]
    assert all(a <= b for a, b in zip(c.off, s.off, strict=True)) and c.off[4] < s.off[4]
    # end < 1: the last unit freezes too, and the head trains alone after it
    e = sched.build(_freeze("progressive", end=0.75), OPTIM, 9, 8, 10)
    assert e.unfrozen(60) == 0 and e.unfrozen(59) == 1


def test_progressive_above_a_chosen_depth_keeps_the_prefix_frozen_throughout():
    s = sched.build(_freeze("progressive", unfrozen=4), OPTIM, 9, 8, 10)
    _trainable_is_a_suffix(s)
    assert s.unfrozen(0) == 4 and s.lowest_cut() == 5
    assert all(s.on[i] == s.steps for i in range(5))  # never trained


def test_gradual_unfreezes_from_the_top_every_few_epochs_up_to_a_maximum():
    s = sched.build(_freeze("gradual", head_epochs=2, every=2, units_each=2, unfrozen=5),
                    OPTIM, 9, steps_per_epoch=8, epochs=10)
    _trainable_is_a_suffix(s)
    per_epoch = [s.unfrozen(8 * e) for e in range(10)]
    assert per_epoch == [0, 0, 2, 2, 4, 4, 5, 5, 5, 5]
    assert s.lowest_cut() == 4
    assert s.changes() == [(0, 0), (16, 2), (32, 4), (48, 5)]


def test_depth_is_a_fixed_prefix_and_old_configs_are_depth():
    s = sched.build(OmegaConf.create({"unfrozen": 3}), OPTIM, 9, 8, 10)  # no strategy key
    assert s.strategy == "depth" and {s.unfrozen(t) for t in range(s.steps)} == {3}
    assert s.changes() == [(0, 3)]


def test_learning_rates_anneal_to_zero_at_the_freeze_and_warm_up_after_unfreezing():
    s = sched.build(_freeze("progressive"), OPTIM, 9, 8, 10)
    stem = [s.lr_factor(0, t) for t in range(40)]
    assert stem[0] == 1.0 and all(a > b for a, b in zip(stem, stem[1:], strict=False)) and stem[-1] < 0.01
    assert s.lr_factor(0, 40) == 0.0  # frozen
    assert s.lr_factor(None, 40) == pytest.approx(0.5)  # the head: cosine over the run
    assert s.lr_factor(8, 40) == s.lr_factor(None, 40)  # trains to the end: the run's shape
    g = sched.build(_freeze("gradual", new_lr_scale=0.1, every=2), OPTIM, 9, 8, 10)
    top_on = g.on[8]
    assert top_on == 8 and g.lr_factor(8, top_on) == pytest.approx(0.1 * g.lr_factor(None, top_on))
    assert g.lr_factor(8, top_on + 16) == pytest.approx(g.lr_factor(None, top_on + 16))


@pytest.mark.parametrize("freeze,epochs,message", [
    (_freeze("progressive", start=0.8, end=0.5), 10, "would end before it starts"),
    (_freeze("progressive", start=0.0), 10, "(0, 1]"),
    (_freeze("progressive", spacing="quadratic"), 10, "linear or cubic"),
    (_freeze("gradual", unfrozen=12), 10, "outside 0..9"),
    (_freeze("progressive", unfrozen=10), 10, "outside 0..9"),
    (_freeze("gradual", head_epochs=10), 10, "no unit would ever be unfrozen"),
    (_freeze("gradual", every=0), 10, "at least 1"),
    (_freeze("gradual", new_lr_scale=0.0), 10, "(0, 1]"),
    (OmegaConf.create({"strategy": "sometimes", "unfrozen": 2}), 10, "freeze=progressive"),
])
def test_bad_parameters_get_one_clear_message(freeze, epochs, message):
    with pytest.raises(UserError) as err:
        sched.build(freeze, OPTIM, 9, 8, epochs)
    assert message in str(err.value)


def test_layer_decay_scales_each_unit_by_its_distance_from_the_top():
    model, _ = build(OmegaConf.create({"name": "resnet18", "num_units": 9, "weights": None}),
                     3, 4, None)
    opt = train.make_optimizer(model, OmegaConf.merge(OPTIM, {"layer_decay": 0.5}))
    lrs = {g["unit"]: g["lr"] for g in opt.param_groups}
    assert lrs == {None: 0.1, 8: 0.05, 7: 0.025, 6: 0.0125, 5: 0.00625}
    with pytest.raises(UserError, match="layer_decay"):
        train.make_optimizer(model, OmegaConf.merge(OPTIM, {"layer_decay": 0}))


# --- the loop: frozen means the same at every step ----------------------------------------

def _look(model, opt, step: int, schedule) -> dict:
    """What the model and the optimizer look like at the top of a step (after any switch)."""
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    return {
        "step": step, "unfrozen": model.unfrozen, "want": schedule.unfrozen(step),
        "units": [(all(p.requires_grad for p in u.parameters()),
                   all(m.training for m in u.modules()),
                   any(not m.training for m in u.modules()),
                   all(id(p) in in_opt for p in u.parameters()),
                   any(id(p) in in_opt for p in u.parameters()),
                   all(p.grad is None for p in u.parameters()))
                  for u in model.units],
        "momentum": {id(p): opt.state[p].get("momentum_buffer")
                     for g in opt.param_groups for p in g["params"] if p in opt.state},
    }


def _fit(make_cfg, monkeypatch, freeze, *overrides, dtype="float32", on_step=None):
    """fit() under ``freeze`` on the tiny config (4 epochs of 3 steps), looking at every step."""
    cfg = make_cfg("trainer.epochs=4", f"cache.dtype={dtype}", *overrides)
    data = data_mod.load(cfg.dataset)
    _, per_epoch = train.steps_per_epoch(len(data.train), int(cfg.trainer.batch_size))
    plan = sched.build(freeze, cfg.optim, 9, per_epoch, 4)
    torch.manual_seed(0)
    model, _ = build(cfg.backbone, len(data.classes), plan.unfrozen(0), None)
    cpu = torch.device("cpu")
    fed = cache.for_trial(model, data, cfg.cache, None, cpu, test_cut=plan.lowest_cut())
    seen: list[dict] = []
    original = train.set_learning_rates

    def record(opt, schedule, step):
        seen.append(_look(model, opt, step, schedule))
        if on_step is not None:
            on_step(model, schedule, step)
        original(opt, schedule, step)

    monkeypatch.setattr(train, "set_learning_rates", record)
    result = train.fit(model, data, cfg.trainer, cfg.optim, cpu, feeds=fed, schedule=plan,
                       time=fed.time())
    return model, data, plan, fed, result, seen


@pytest.mark.parametrize("strategy", ["progressive", "gradual"])
def test_frozen_keeps_its_meaning_at_every_step(make_cfg, monkeypatch, strategy):
    _, _, plan, _, result, seen = _fit(make_cfg, monkeypatch, _freeze(strategy))
    assert len(seen) == plan.steps and len(plan.changes()) > 3
    for s in seen:
        assert s["unfrozen"] == s["want"], s["step"]
        cut = 9 - s["unfrozen"]
        for i, (grad, training, any_eval, all_in, any_in, no_grad) in enumerate(s["units"]):
            if i >= cut:  # trainable: gradients, train mode, in the optimizer
                assert grad and training and all_in, (s["step"], i)
            else:  # frozen: none of the four
                assert not any_in and any_eval and not training and no_grad, (s["step"], i)
    # momentum of units that stay trainable survives every switch (the same buffer, kept)
    kept = 0
    for before, after in zip(seen, seen[1:], strict=False):
        for p, buf in before["momentum"].items():
            if p in after["momentum"] and buf is not None:
                assert after["momentum"][p] is buf
                kept += 1
    assert kept
    assert [e.trainable_units for e in result.epochs] == \
        [plan.unfrozen(e * plan.steps_per_epoch) for e in range(4)]
    assert result.time.switch_time_s > 0 and len(result.time.switch_s) == len(plan.changes()) - 1


def test_a_unit_frozen_mid_run_keeps_its_weights_and_batchnorm_statistics(make_cfg, monkeypatch):
    snap: dict = {}

    def on_step(model, schedule, step):
        if step == schedule.off[0]:  # the stem has just frozen
            snap.update({k: v.clone() for k, v in model.units[0].state_dict().items()})

    model, *_ = _fit(make_cfg, monkeypatch, _freeze("progressive"), on_step=on_step)
    assert any("running_mean" in k for k in snap)
    for k, v in model.units[0].state_dict().items():
        assert torch.equal(v, snap[k]), k


# --- the cache after freezing -------------------------------------------------------------

def test_after_freezing_the_rows_are_the_frozen_units_outputs_kept_by_this_run(make_cfg, outputs,
                                                                              monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sweeper.train")
    model, data, plan, fed, _, _ = _fit(make_cfg, monkeypatch, _freeze("progressive", unfrozen=6))
    shared = sorted(p.name for p in (outputs / "cache" / "features").glob("*.feat"))
    # train, val, test at the start's cut 3 and at cuts 1, 2 (passed on the way): nothing
    # per-run on disk
    assert len(shared) == 9
    train_feed = fed.train
    assert train_feed.source.startswith("run (derived") and train_feed.cut > 3
    model.eval()
    with torch.no_grad():
        x = data.normalize(data.train.images).float()
        for unit in model.units[:train_feed.cut]:
            x = unit(x)
    torch.testing.assert_close(train_feed.rows, x, rtol=1e-5, atol=1e-5)
    # the last switches leave less than an epoch: no per-run entry for those
    assert train_feed.cut < 9 - plan.unfrozen(plan.steps - 1)
    # the log says, in words, where each switch's steps get their inputs
    switches = [r.getMessage() for r in caplog.records if "now training" in r.getMessage()]
    assert any("train rows from this run's cache at cut" in m for m in switches), switches
    assert "newly frozen unit" in switches[-1], switches
    assert not any("(run (" in m for m in switches), switches


def test_gradual_reuses_the_shared_prefix_cache(make_cfg, outputs, monkeypatch):
    cache.MEMORY.clear()  # entries of earlier tests in this process would be hits, not files here
    _, _, plan, fed, result, _ = _fit(make_cfg, monkeypatch, _freeze("gradual"), dtype="float16")
    assert fed.train.source in ("filled", "hit (memory)", "hit (disk)") or \
        fed.train.source.startswith("derived")
    assert fed.train.cut == 9 - plan.unfrozen(plan.steps - 1)
    # every cut the run trained at is a shared entry, which a fixed depth then finds
    entries = list((outputs / "cache" / "features").glob("*.feat"))
    assert len(entries) >= len(plan.changes())
    cache.MEMORY.clear()
    depth = run_trial(make_cfg("trainer.epochs=1", "cache.dtype=float16",
                               f"freeze.unfrozen={plan.unfrozen(plan.steps - 1)}"))
    assert depth["cache_hits"] >= 2  # train and val at that cut, from gradual's entries
    # charged once: the largest recorded cost of the train entries it used
    assert result.time.train_fill_s > 0


def test_switch_time_is_part_of_train_time_and_shared_fills_are_charged_once():
    t = timing.TrialTime(train_fill_s=1.0, val_fill_s=0.5)
    t.add_epoch(2.0, 0.1)
    t.add_switch(0.9, cache.Recut(train_s=0.6, val_s=0.2, train_shared_s=0.5, val_shared_s=0.1,
                                  train_fill_s=1.5, val_fill_s=0.3))
    assert t.switch_time_s == pytest.approx(0.9 - 0.2 - 0.5)  # model, optimizer, per-run fill
    assert t.train_fill_s == 1.5 and t.val_fill_s == 0.5  # the largest, not the sum
    assert t.train_time_s == pytest.approx(2.0 + 1.5 + 0.2)
    assert t.eval_time_s == pytest.approx(0.1 + 0.5 + 0.1)


# --- trials: logged, re-run, bad values ---------------------------------------------------

@pytest.mark.parametrize("strategy", ["progressive", "gradual"])
def test_a_strategy_trial_logs_its_parameters_and_units_per_epoch_and_reruns_exactly(
        make_cfg, outputs, mlflow_client, strategy):
    cfg = make_cfg(f"freeze={strategy}", "trainer.epochs=3", "trainer.deterministic=true",
                   "optim.layer_decay=0.8")
    result = run_trial(cfg)
    run = mlflow_client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == f"resnet18-fake-{strategy}-unfrozen9"
    params = run.data.params
    assert params["freeze.strategy"] == strategy and params["optim.layer_decay"] == "0.8"
    keys = {"progressive": ("freeze.start", "freeze.end", "freeze.spacing"),
            "gradual": ("freeze.head_epochs", "freeze.every", "freeze.units_each")}[strategy]
    assert all(k in params for k in keys)
    units = [m.value for m in sorted(mlflow_client.get_metric_history(run.info.run_id,
                                                                      "trainable_units"),
                                     key=lambda m: m.step)]
    assert len(units) == 3 and len(set(units)) > 1
    assert run.data.tags["freeze.schedule"].startswith(
        "9 from step 0" if strategy == "progressive" else "0 from step 0")
    m = run.data.metrics
    assert m["train_time_s"] >= m["switch_time_s"] > 0
    again = rerun(result["run_id"], f"sqlite:///{outputs}/mlflow.db")
    assert again["val_acc"] == result["val_acc"] and again["test_acc"] == result["test_acc"]


@pytest.mark.parametrize("overrides,message", [
    (["freeze=progressive", "freeze.start=0.9", "freeze.end=0.3"], "would end before it starts"),
    (["freeze=gradual", "freeze.unfrozen=12"], "outside 0..9"),
])
def test_bad_strategy_values_fail_the_command_with_one_message(cli, overrides, message):
    done = cli(*overrides)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_old_logged_configs_without_a_strategy_still_run(make_cfg):
    cfg = make_cfg("freeze.unfrozen=1")
    OmegaConf.set_struct(cfg, False)
    del cfg.freeze["strategy"]
    del cfg.optim["layer_decay"]
    assert run_trial(cfg)["val_acc"] >= 0


# --- the study over strategies ------------------------------------------------------------

def test_the_strategies_search_space_samples_each_strategy_its_own_parameters(outputs):
    import optuna

    from sweeper.config import compose
    from sweeper.study import parse_space

    cfg = compose(overrides=["hparams_search=strategies", f"paths.outputs={outputs}"],
                  return_hydra_config=True)
    sweep = cfg.hydra.sweeper
    assert sweep.sampler._target_.endswith("TPESampler") and "train_time_s" in sweep.objectives
    space = parse_space(OmegaConf.to_container(sweep.params, resolve=True),
                        OmegaConf.to_container(sweep.conditions, resolve=True))
    own = {"progressive": {"freeze.start", "freeze.spacing"},
           "gradual": {"freeze.head_epochs", "freeze.every", "freeze.units_each"}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        overrides = dict(o.split("=", 1) for o in space.suggest(study.ask(), lambda k: None))
        strategy = overrides["freeze"]
        seen.add(strategy)
        for other, keys in own.items():
            assert bool(keys & overrides.keys()) == (other == strategy), overrides
    assert seen == {"depth", "progressive", "gradual"}


def test_a_study_over_strategies_runs_and_its_trials_say_which(cli, outputs, mlflow_client,
                                                              make_cfg):
    from sweeper.report import trial_frame
    from sweeper.tracking import Tracker

    done = cli("freeze=depth,progressive,gradual", "freeze.unfrozen=3", "trainer.epochs=2",
               "optim.layer_decay=0.8", "hydra/sweeper/sampler=grid", flags=("-m",))
    assert done.returncode == 0, done.stderr[-4000:]
    exp = mlflow_client.get_experiment_by_name("sweeper")
    runs = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'trial'")
    assert sorted(r.data.params["freeze.strategy"] for r in runs) == ["depth", "gradual", "progressive"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # one report for all of them: a row per strategy, one Pareto plot, the pick named by strategy
    (report,) = (outputs / "studies").glob("*/report/report.md")
    text = report.read_text()
    for strategy in ("depth", "progressive", "gradual"):
        assert f"| {strategy} | 3 | {strategy}: " in text, text
    assert (report.parent / "pareto.png").is_file()
    table = pd.read_csv(report.parent / "depths.csv")
    assert sorted(table.strategy) == ["depth", "gradual", "progressive"]
    assert "## Per strategy and depth" in text and "units/step" in text
    parent = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'study'")[0]
    # each trial's command trains its strategy with its parameters, and nothing of the others
    trials = trial_frame(Tracker(make_cfg().tracking), parent.info.run_id)
    commands = {s: set(c.split()) for s, c in zip(trials.strategy, trials.command, strict=True)}
    assert all({"freeze.unfrozen=3", "optim.layer_decay=0.8"} <= c for c in commands.values())
    assert not any(w.startswith(("freeze=p", "freeze=g", "freeze.start", "freeze.head"))
                   for w in commands["depth"])
    assert {"freeze=progressive", "freeze.start=0.5", "freeze.end=1.0", "freeze.spacing=linear"} \
        <= commands["progressive"]
    assert {"freeze=gradual", "freeze.head_epochs=1", "freeze.every=1", "freeze.units_each=1",
            "freeze.new_lr_scale=1.0"} <= commands["gradual"]
    assert not any(w.startswith("freeze.start") for w in commands["gradual"])
    tags = parent.data.tags
    assert tags["recommended.strategy"] in {"depth", "progressive", "gradual"}
    if tags["recommended.strategy"] != "depth":
        assert f"freeze={tags['recommended.strategy']}" in tags["recommended.command"].split()


def _trials(rows):
    """A study's trials as the report reads them from MLflow (sweeper.report.trial_frame)."""
    out = []
    for i, (strategy, unfrozen, seed, val_acc) in enumerate(rows):
        values = {"progressive": {"start": 0.5, "end": 1.0, "spacing": "cubic"}}.get(strategy, {})
        out.append({
            "trial": i, "run_id": f"run{i}", "state": State.COMPLETE, "strategy": strategy,
            "unfrozen": unfrozen, "num_units": 9,
            "schedule": sched.summary(strategy, unfrozen, values),
            "units": sched.mean_units(strategy, unfrozen, 9, 10, values),
            "lr_head": 0.05, "lr_backbone": 0.005, "seed": seed, "split_seed": 0,
            "setting": (("optim.lr_head", 0.05),), "val_acc": val_acc, "test_acc": val_acc,
            "train_time_s": 8.0 if (strategy, unfrozen) == ("depth", 9) else 4.0,
            "trainable_params": 1000, "val_images": 1000, "order": i,
            "command": f"python -m sweeper.run freeze={strategy} freeze.unfrozen={unfrozen}"})
    return pd.DataFrame(out)


def test_the_rule_weighs_each_strategy_by_the_units_it_trains_and_names_it():
    from sweeper.report import decide_study, depth_table, recommend

    # Three seeds each: full fine-tuning best, progressive (6.6 units a step on average) 0.2
    # points below it, two fixed units 5 points below.
    trials = _trials([(s, u, seed, acc + 0.001 * seed) for seed in range(3)
                      for s, u, acc in (("depth", 9, 0.90), ("depth", 2, 0.85),
                                        ("progressive", 9, 0.898))])
    decision = decide_study(trials, tolerance=1.0)
    assert list(decision.arms) == [("depth", 2), ("progressive", 9), ("depth", 9)]  # by cost
    assert decision.reference == ("depth", 9) and decision.recommended == ("progressive", 9)
    assert decision.settled  # the one cheaper configuration, two units, is worse
    table = depth_table(trials, decision)
    assert list(zip(table.strategy, table.unfrozen, strict=True)) == [
        ("depth", 2), ("depth", 9), ("progressive", 9)]
    pick, text = recommend(table, decision)
    assert pick["strategy"] == "progressive"
    assert text.startswith("Use freeze=progressive (progressive: the last 9 units train, then "
                           "freeze from 0.5 to 1 of training (cubic)")
    assert "The best mean is depth 9's" in text and "freeze=progressive unfrozen=9 is at most" in text
    assert "cheaper configurations" in text and "settled" in text


def test_the_default_study_sends_a_search_over_strategies_to_a_sampler_that_compares_them():
    from sweeper.config import compose, task_config
    from sweeper.study import search, settings_in

    cfg = compose(return_hydra_config=True)
    task = task_config(cfg)
    settings = settings_in(task, cfg.hydra.sweeper)
    OmegaConf.resolve(settings)
    with pytest.raises(UserError,
                       match="hparams_search=strategies .* or add hydra/sweeper/sampler=grid"):
        search(settings, task, ["freeze=depth,progressive,gradual"])
    assert "freeze" in search(settings, task, ["freeze=progressive"]).space.fixed  # one strategy
