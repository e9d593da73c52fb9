"""Coming from Hydra's official Optuna sweeper or lightning-hydra-template: their search files
run here, and each of their keys is honoured or refused with the line to write instead."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from sweeper.config import CONF_DIR, compose, task_config
from sweeper.errors import UserError
from sweeper.study import check_settings, make_sampler, parse_space, search, settings_in
from sweeper.tracking import param_name
from sweeper.trial import RESULTS, run_trial
from tests.conftest import ROOT, TINY

SWEEP_JOURNAL = "optuna-journal.log"  # where storage: null keeps a sweep's study (README)
TEMPLATE = ROOT / "tests" / "lightning_template"  # its hparams_search/mnist_optuna.yaml

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def add_weight_decay(cfg, trial: optuna.Trial) -> None:
    """A custom_search_space hook as hydra-optuna-sweeper's users write them."""
    trial.suggest_float("optim.weight_decay", 1e-5, 1e-3, log=True)


def _check(*overrides: str, sweep_dir: str = "/sweeps/one", **changes):
    """The checked hydra.sweeper settings of the TINY config with ``overrides``, ``changes``
    merged into them as a file's would be."""
    cfg = compose(overrides=[*TINY, *overrides], return_hydra_config=True)
    node = OmegaConf.merge(OmegaConf.to_container(cfg.hydra.sweeper, resolve=False), changes)
    task = task_config(cfg)
    return check_settings(settings_in(task, node), task, choices=cfg.hydra.runtime.choices,
                          sweep_dir=sweep_dir, storage=False)


def _fails_cleanly(done, *expected: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr


# -- a lightning-hydra-template search file, end to end ------------------------------------

def test_a_lightning_template_search_file_runs_from_a_config_dir(cli, outputs, mlflow_client):
    """Its official _target_, optimized_metric + direction, storage/study_name null, inline TPE
    and its own params: a study of val_acc alone over its space only, kept in its sweep folder."""
    r = cli("hparams_search=mnist_optuna", "hydra.sweeper.n_trials=2",
            flags=(f"--config-dir={TEMPLATE}",))
    assert r.returncode == 0, r.stderr[-3000:]
    (journal,) = (outputs / "multirun").rglob(SWEEP_JOURNAL)  # storage: null
    assert not [p for p in [*outputs.rglob("None"), *ROOT.glob("None")]]
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    (name,) = optuna.get_all_study_names(storage)
    assert name.startswith("freeze-resnet18-fake-")  # study_name: null, a new one
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.metric_names == ["val_acc"] and [d.name for d in study.directions] == ["MAXIMIZE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:  # the file's space replaced the default one (freeze.unfrozen 0..9)
        assert set(t.params) <= {"optim.lr_head", "freeze.unfrozen", "optim.lr_backbone",
                                 "optim.weight_decay"}  # batch size: fixed by TINY's value
        assert t.params["freeze.unfrozen"] in (0, 1, 2)
        assert 1e-4 <= t.params["optim.lr_head"] <= 0.1
    exp = mlflow_client.get_experiment_by_name("sweeper")
    (parent,) = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'study'")
    assert parent.data.params["sampler"].startswith("TPESampler(seed=1234, n_startup_trials=10")
    assert parent.data.params["objectives"] == "val_acc:maximize"
    child = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'trial'")[0]
    # Training a trial again is a run, not the file's sweep.
    assert child.data.tags["rerun_command"].endswith("hydra.mode=RUN")


def test_add_and_delete_overrides_and_a_custom_search_space(cli, outputs, mlflow_client):
    """+key=value and ~key in a sweep; the search is logged under sanitised param names; a
    custom_search_space hook adds its parameter to every trial."""
    r = cli("+trainer.note=x", "~trainer.compile", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.custom_search_space=tests.test_compat.add_weight_decay",
            flags=("-m",))
    assert r.returncode == 0, r.stderr[-3000:]
    exp = mlflow_client.get_experiment_by_name("sweeper")
    (parent,) = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'study'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.trainer.note"] == "fixed x"
    assert parent.data.params["search.trainer.compile"] == "deleted"
    children = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'trial'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        assert c.data.params["trainer.note"] == "x"
        assert "trainer.compile" not in c.data.params
        assert 1e-5 <= float(c.data.params["optim.weight_decay"]) <= 1e-3


@pytest.mark.parametrize(("key", "name"), [
    ("search.+hparams_search", "search.hparams_search"),
    ("search.~trainer.compile", "search.trainer.compile"),
    ("search.++a.b", "search.a.b"),
    ("search.a:b", "search.a_b"),
    ("/a//../b", "a/b"),
    ("optim.lr_head", "optim.lr_head"),
])
def test_mlflow_param_names_are_made_in_one_place(key, name):
    assert param_name(key) == name


def test_add_and_delete_overrides_join_the_space_as_fixed_keys():
    space = parse_space({"freeze.unfrozen": "int(interval(0, 2))"}, {},
                        ["+trainer.note=x", "~trainer.compile", "~trainer.seed=0"])
    assert space.describe() == {"freeze.unfrozen": "int(0..2)", "+trainer.note": "fixed x",
                                "~trainer.compile": "deleted", "~trainer.seed": "fixed 0"}
    overrides = space.suggest(optuna.create_study().ask(), lambda key: None)
    assert overrides[1:] == ["+trainer.note=x", "~trainer.compile", "~trainer.seed=0"]


def test_direction_without_a_metric_names_the_objectives_line(cli):
    _fails_cleanly(cli("hydra.sweeper.direction=maximize", flags=("-m",)),
                   "hydra.sweeper.objectives", "objectives: {val_acc: maximize}")


def test_a_metric_the_trial_does_not_return_is_named_before_any_trial(cli, outputs):
    """lightning-hydra-template's own metric name (val/acc_best) in its file: one message
    naming the metrics a trial returns, before Hydra makes a sweep folder."""
    done = cli("hparams_search=mnist_optuna", "optimized_metric=val/acc_best",
               flags=(f"--config-dir={TEMPLATE}",))
    _fails_cleanly(done, "val/acc_best is not a metric a trial returns",
                   "val_acc, best_val_acc, test_acc, train_time_s")
    assert not (outputs / "multirun").exists()
    with pytest.raises(UserError, match=r"val_accuracy is not a metric a trial returns \(did "
                                        r"you mean val_acc\?\)"):
        _check("+optimized_metric=val_accuracy", direction="maximize")


def test_a_trial_returns_every_metric_a_study_may_optimise(make_cfg):
    # cache.mode=off: no entry left in this process's RAM tier for later tests to find.
    result = run_trial(make_cfg("cache.mode=off"))
    assert set(RESULTS) <= set(result)


# -- each official key: honoured ------------------------------------------------------------

def test_optimized_metric_and_direction_become_the_objectives():
    assert dict(_check("+optimized_metric=test_acc", direction="maximize").objectives) == {
        "test_acc": "maximize"}
    both = _check("+optimized_metric=[val_acc,train_time_s]", direction=["maximize", "minimize"])
    assert dict(both.objectives) == {"val_acc": "maximize", "train_time_s": "minimize"}
    assert dict(_check().objectives) == dict(_check(direction=None).objectives)  # untouched


def test_params_replace_the_default_space_unless_extended():
    default = _check()
    assert list(default.params) == ["freeze.unfrozen", "optim.lr_head", "optim.lr_backbone"]
    mine = {"optim.weight_decay": "interval(0.0, 0.001)"}
    assert dict(_check(params=mine).params) == mine
    assert list(_check(params=mine, extend_default_params=True).params) == [
        "freeze.unfrozen", "optim.lr_head", "optim.lr_backbone", "optim.weight_decay"]


@pytest.mark.parametrize("null", [None, "None"])
def test_null_storage_and_study_name_make_a_study_for_this_sweep(null):
    s = _check(storage=null, study_name=null, sweep_dir="/sweeps/one")
    assert s.storage == str(Path("/sweeps/one") / SWEEP_JOURNAL)
    assert s.study_name.startswith("freeze-resnet18-fake-") and s.study_name != "freeze-resnet18-fake"
    again = _check(storage=s.storage, study_name=s.study_name)  # what a job of the sweep sees
    assert (again.storage, again.study_name) == (s.storage, s.study_name)


def test_an_inline_sampler_gets_only_the_arguments_it_takes():
    """CmaEsSampler given inline over the TPE defaults: multivariate, group, constant_liar
    are TPE's and dropped; what CMA-ES takes (seed, n_startup_trials) is kept."""
    s = _check("hydra/sweeper/sampler=tpe", "hydra/sweeper/objectives=accuracy",
               sampler={"_target_": "optuna.samplers.CmaEsSampler", "seed": 3})
    assert dict(s.sampler) == {"_target_": "optuna.samplers.CmaEsSampler", "seed": 3,
                               "n_startup_trials": 6}
    assert isinstance(make_sampler(s.sampler), optuna.samplers.CmaEsSampler)


def test_a_custom_search_space_hook_adds_its_parameters():
    space = parse_space({"freeze.unfrozen": "int(interval(0, 2))"})
    trial = optuna.create_study().ask()
    overrides = space.suggest(trial, lambda key: None, lambda t: add_weight_decay(None, t))
    assert overrides[0].startswith("freeze.unfrozen=")
    assert overrides[1].startswith("optim.weight_decay=")


def test_the_official_target_is_an_alias_of_this_sweeper():
    from hydra.core.plugins import Plugins

    import hydra_plugins.sweeper_optuna as ours

    cls = Plugins.instance().class_name_to_class[ours.OFFICIAL]
    assert issubclass(cls, ours.OptunaSweeper)


# -- each official key: refused, saying what to write instead -------------------------------

@pytest.mark.parametrize(("changes", "overrides", "expected"), [
    ({"direction": "maximize"}, (), "objectives: {val_acc: maximize}"),
    ({"direction": ["maximize", "minimize"]}, (),
     "objectives: {val_acc: maximize, train_time_s: minimize}"),
    ({"direction": ["maximize", "minimize"]}, ("+optimized_metric=val_acc",),
     "give one direction per metric"),
    ({"direction": "up"}, ("+optimized_metric=val_acc",), "up is not one of maximize, minimize"),
    ({}, ("+optimized_metric=val_acc",), "without hydra.sweeper.direction"),
    ({"search_space": {"model.lr": {"type": "float", "low": 0.0001, "high": 0.2},
                       "datamodule.batch_size": {"type": "categorical", "choices": [32, 64]},
                       "model.depth": {"type": "int", "low": 1, "high": 9, "step": 2}}}, (),
     "params:\n    model.lr: interval(0.0001, 0.2)\n    datamodule.batch_size: choice(32, 64)"
     "\n    model.depth: range(1, 11, 2)"),
    ({"custom_search_space": "nowhere.to_be_found"}, (),
     "custom_search_space=nowhere.to_be_found"),
    ({"n_trial": 5}, (), "n_trial (did you mean n_trials?) is not a setting"),
    ({"sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 0, "n_startup": 4}},
     ("hydra/sweeper/sampler=random",), "RandomSampler takes no argument n_startup"),
])
def test_a_key_of_the_official_plugin_is_refused_with_what_to_write(changes, overrides, expected):
    with pytest.raises(UserError, match=None) as e:
        _check(*overrides, **changes)
    assert expected in str(e.value)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml")))
def test_every_named_search_composes_and_passes_the_checks(name):
    """The project's own hparams_search files: a sweep without -m, settings that check."""
    cfg = compose(overrides=[*TINY, f"hparams_search={name}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    task = task_config(cfg)
    s = check_settings(settings_in(task, cfg.hydra.sweeper), task,
                       choices=cfg.hydra.runtime.choices, sweep_dir="/sweeps/one", storage=False)
    found = search(s, task)
    assert found.space.sampled
    assert isinstance(make_sampler(s.sampler, search=found), optuna.samplers.BaseSampler)
