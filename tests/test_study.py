"""The Optuna sweeper: a study end to end, resume, grid, pruning, failures, the basic sweeper."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from sweeper.errors import UserError
from sweeper.study import parse_space as parse
from tests.conftest import CONF, TINY

STUDY = "freeze-resnet18-fake"  # the default study name under TINY

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def load_study(outputs: Path, name: str = STUDY) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(outputs / "optuna" / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def study_runs(client, name: str = STUDY):
    """The parent run of study ``name`` and its child runs."""
    exp = client.get_experiment_by_name("sweeper")
    parents = client.search_runs([exp.experiment_id],
                                 f"tags.`sweeper.kind` = 'study' and tags.`optuna.study_name` = '{name}'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return parents[0], children


def check_consistent(study: optuna.Study, client) -> None:
    """Optuna and MLflow agree: one child run per trial, same state and metrics."""
    parent, children = study_runs(client, study.study_name)
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    by_id = {r.info.run_id: r for r in children}
    assert not [r for r in children if r.info.status == "RUNNING"]
    for t in study.trials:
        assert t.state != TrialState.RUNNING
        mine = [r for r in children if r.data.tags["optuna.trial_number"] == str(t.number)]
        if t.system_attrs.get("sweeper:lost"):
            assert all(r.info.status in ("FAILED", "KILLED") for r in mine)
            continue
        assert len(mine) == 1, (t.number, [r.info.run_id for r in mine])
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["sweeper.kind"] == "trial"
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.tags["state"] == "complete"
            for name, value in zip(study.metric_names, t.values, strict=True):
                assert run.data.metrics[name] == pytest.approx(value)
        elif t.state == TrialState.PRUNED:
            assert run.info.status == "KILLED" and run.data.tags["state"] == "pruned"
        else:
            assert run.info.status == "FAILED" and run.data.tags["state"] == "failed"
            assert run.data.tags["error"] and t.user_attrs["error"]


OTHERS = ("hydra/sweeper/sampler=tpe", "hydra/sweeper/objectives=accuracy_time",
          "hydra/sweeper/pruner=none")  # the study before the depth sampler: still selectable


def test_six_trial_study(cli, outputs, mlflow_client):
    r = cli("hydra.mode=MULTIRUN", "hydra.sweeper.n_trials=6", *OTHERS)
    assert r.returncode == 0, r.stderr[-3000:]
    study = load_study(outputs)
    assert len(study.trials) == 6
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.metric_names == ["val_acc", "train_time_s"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in study.trials:  # the default space; lr_backbone only when something trains
        assert 0 <= t.params["freeze.unfrozen"] <= 9
        assert ("optim.lr_backbone" in t.params) == (t.params["freeze.unfrozen"] > 0)
    parent, children = study_runs(mlflow_client)
    assert len(children) == 6
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.storage"] == str(outputs / "optuna" / "journal.log")
    assert parent.data.params["search.freeze.unfrozen"] == "int(0..9)"
    assert parent.data.params["search.optim.lr_backbone"].endswith("if freeze.unfrozen > 0")
    assert parent.data.params["sampler"].startswith("TPESampler(")
    assert parent.data.metrics["n_trials_complete"] == 6
    assert parent.data.metrics["pareto_size"] == len(study.best_trials)
    artifacts = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    assert {"pareto.json", "pareto.csv", "trials.csv", "config.yaml"} <= artifacts
    pareto = Path(mlflow_client.download_artifacts(parent.info.run_id, "pareto.csv",
                                                   str(outputs))).read_text().splitlines()
    assert pareto[0].startswith("trial,state,val_acc,train_time_s")
    assert len(pareto) == 1 + len(study.best_trials)
    check_consistent(study, mlflow_client)
    # the report is made at the end of every study, and the terminal shows its recommendation
    report = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/pareto.png", "report/depth.png",
            "report/importance.png"} <= report
    assert "Recommendation:" in r.stdout
    study_dir = outputs / "studies" / study.study_name / "report"
    assert "## Recommendation" in (study_dir / "report.md").read_text()


def test_resume_counts_the_study_total(cli, outputs, mlflow_client):
    for n, expected in ((4, 4), (4, 4), (6, 6)):
        r = cli("hydra.mode=MULTIRUN", f"hydra.sweeper.n_trials={n}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(load_study(outputs).trials) == expected
        parent, children = study_runs(mlflow_client)
        assert len(children) == expected
        assert parent.info.status == "FINISHED"
    check_consistent(load_study(outputs), mlflow_client)


def test_resume_refuses_other_settings(cli, outputs):
    assert cli("hydra.mode=MULTIRUN", "hydra.sweeper.n_trials=1").returncode == 0
    r = cli("hydra.mode=MULTIRUN", "hydra.sweeper.n_trials=2", "trainer.epochs=2")
    assert r.returncode != 0
    assert "was started with the overrides" in r.stderr
    assert len(load_study(outputs).trials) == 1



def test_resume_refuses_another_sampler(cli, outputs):
    """A study resumes with the sampler it was started with: the grid sampler would finish a
    default study as a grid study (and the depth sampler repeat a grid study's settings)."""
    assert cli("hydra.mode=MULTIRUN", "hydra.sweeper.n_trials=1").returncode == 0
    r = cli("hydra.mode=MULTIRUN", "hydra/sweeper/sampler=grid")
    assert r.returncode != 0
    assert (f"Study '{STUDY}' was started with hydra/sweeper/sampler=depth; this sweep has "
            "hydra/sweeper/sampler=grid.") in r.stderr
    assert f"hydra.sweeper.study_name={STUDY}-grid" in r.stderr
    assert len(load_study(outputs).trials) == 1
    # a study recorded before the sampler was (no user attr "sampler") resumes as it did
    study = load_study(outputs)
    study._storage.set_study_user_attr(study._study_id, "sampler", None)
    r = cli("hydra.mode=MULTIRUN", "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(load_study(outputs).trials) == 2

def test_grid_runs_every_depth(cli, outputs, mlflow_client):
    r = cli("hydra.mode=MULTIRUN", "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=3")
    assert r.returncode == 0, r.stderr[-3000:]
    study = load_study(outputs)
    assert sorted(t.params["freeze.unfrozen"] for t in study.trials) == list(range(10))
    assert all(set(t.params) == {"freeze.unfrozen"} for t in study.trials)
    parent, children = study_runs(mlflow_client)
    assert len(children) == 10 and parent.info.status == "FINISHED"


def test_basic_sweeper_still_works(cli, outputs, mlflow_client):
    r = cli("hydra.mode=MULTIRUN", "hydra/sweeper=basic", "freeze.unfrozen=0,2,4")
    assert r.returncode == 0, r.stderr[-3000:]
    exp = mlflow_client.get_experiment_by_name("sweeper")
    runs = mlflow_client.search_runs([exp.experiment_id])
    assert sorted(r.data.params["freeze.unfrozen"] for r in runs) == ["0", "2", "4"]
    assert not (outputs / "optuna").exists()


def tiny_cfg(outputs: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.outputs={outputs}", *overrides],
                       return_hydra_config=True)


@pytest.mark.parametrize("sampler", ["depth", "tpe", "nsgaii", "gp", "random", "qmc", "grid",
                                     "cmaes"])
@pytest.mark.parametrize("pruner", ["depth", "none", "median", "hyperband"])
def test_configs_build(outputs, sampler, pruner):
    from sweeper import study as _optuna  # its sampler and pruner builders
    from sweeper.config import task_config

    cfg = tiny_cfg(outputs, f"hydra/sweeper/sampler={sampler}", f"hydra/sweeper/pruner={pruner}")
    task = task_config(cfg)
    s = _optuna.check_settings(_optuna.settings_in(task, cfg.hydra.sweeper), task,
                               choices=cfg.hydra.runtime.choices)
    found = _optuna.search(s, task)
    assert isinstance(_optuna.make_sampler(s.sampler, search=found), optuna.samplers.BaseSampler)
    assert isinstance(_optuna.make_pruner(s.get("pruner")), optuna.pruners.BasePruner)
    if sampler == "depth":  # it repeats with the next seed and split: both join the space
        assert {"trainer.seed", "dataset.split_seed"} <= set(found.space.sampled)
        assert found.start["optim.lr_head"] == cfg.optim.lr_head


def test_space_from_override_grammar():
    space = parse({"a": "int(interval(0, 9))", "b": "tag(log, interval(1e-4, 1e-1))",
                   "c": "choice(x, y)", "d": "range(0, 10, 2)", "e": "3"},
                  {"b": "a > 0"}, ["c=x,z", "f=1.5"])
    assert space.describe() == {"a": "int(0..9)", "b": "float(0.0001..0.1, log) if a > 0",
                                "c": "choice(x, z)", "d": "int(0..8, step 2)",
                                "e": "fixed 3", "f": "fixed 1.5"}
    assert list(space.sampled)[-1] == "b"  # conditions are sampled after what they refer to
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        overrides = dict(o.split("=", 1) for o in space.suggest(trial, lambda k: None))
        assert ("b" in overrides) == (overrides["a"] != "0")
        study.tell(trial, 0.0)
    with pytest.raises(UserError):
        parse({"a": "interval(0"})


def test_plugin_found_from_another_directory(tmp_path):
    code = ("from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
            "print([p.__module__ + '.' + p.__name__ for p in Plugins.instance().discover(Sweeper)])")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert "hydra_plugins.sweeper_optuna.OptunaSweeper" in r.stdout, r.stderr


def test_a_trials_last_progress_record_holds_its_whole_training(outputs):
    # Progress is written at most once a second (tiny epochs: the first, then none until the
    # end): the record a finished trial leaves still names its last epoch and its whole
    # training time (its overhead is its wall time less that).
    from sweeper.study import optimize

    cfg = tiny_cfg(outputs, *OTHERS, "trainer.epochs=3")
    thresholds = gc.get_threshold()
    result = optimize(cfg, {"n_trials": 2, "study_name": "progress"}, progress="none")
    # the garbage collector is as the study found it (it froze what was there, for its trials)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    for t in result.study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        progress = t.system_attrs["sweeper:progress"]
        assert progress["epoch"] == progress["epochs"] == 3
        assert progress["training_s"] > 0


def test_a_study_tests_the_trials_its_report_shows_at_its_end(outputs, mlflow_client):
    from sweeper.report import candidate_runs, make_report, tested_runs, trial_frame
    from sweeper.states import StateStore
    from sweeper.study import optimize
    from sweeper.tracking import Tracker

    cfg = tiny_cfg(outputs, *OTHERS)  # TPE over two depths: several trials per depth
    result = optimize(cfg, {"n_trials": 6, "study_name": "tested"}, progress="none",
                      arguments=["freeze.unfrozen=0,9"])
    trials = trial_frame(Tracker(cfg.tracking), result.parent_run_id)
    # the recommended depth's, the reference's and the Pareto set's (the best trial) runs
    best = [row["trial"] for row in result.pareto]
    assert len(best) == 1 and trials[trials.trial == best[0]].val_acc.item() == trials.val_acc.max()
    shown = set(tested_runs(trials, pareto=best))
    assert len(trials) == 6
    # test_acc lands on exactly those runs; the study keeps the trained parts of each
    # depth's trials at its chosen learning rates (a resumed study may recommend another)
    assert set(trials[trials.test_acc.notna()].run_id) == shown
    assert set(StateStore.for_study(cfg.paths, "tested").run_ids()) == \
        set(candidate_runs(trials)) | shown
    report = make_report(cfg, parent_run=result.parent_run_id)
    rec = report.table.set_index("unfrozen").loc[report.recommended["unfrozen"]]
    assert rec.test_acc == report.recommended["test_acc"] > 0
    # a depth's test acc is the mean over all its measurements, or none at all
    kept = trials[trials.run_id.isin(candidate_runs(trials))]
    whole = {d for d, g in kept.groupby("unfrozen") if set(g.run_id) <= shown}
    assert set(report.table[report.table.test_acc.notna()].unfrozen) == whole
    for row in result.pareto:
        assert row["test_acc"] is not None
    # the study's overhead per trial, on its parent run
    parent = mlflow_client.get_run(result.parent_run_id)
    assert parent.data.metrics["overhead_per_trial_s"] > 0
    assert parent.data.metrics["test_eval_time_s"] > 0

