"""The Optuna sweeper's failure and pruning paths, each asserted on Optuna and MLflow."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from sweeper.errors import UserError
from tests.test_study import check_consistent, load_study, study_runs, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def test_failures_and_a_bad_override(cli, outputs, mlflow_client):
    # backbone=nope does not compose (the launcher raises); unfrozen=99 fails in the job.
    r = cli("hydra.mode=MULTIRUN", "hydra/sweeper/sampler=grid", "backbone=resnet18,nope",
            "freeze.unfrozen=choice(0,99)", "hydra.sweeper.max_failure_rate=1.0")
    assert r.returncode == 0, r.stderr[-3000:]
    study = load_study(outputs)
    states = {(t.params["backbone"], t.params["freeze.unfrozen"]): t.state for t in study.trials}
    assert states == {("resnet18", 0): TrialState.COMPLETE, ("resnet18", 99): TrialState.FAIL,
                      ("nope", 0): TrialState.FAIL, ("nope", 99): TrialState.FAIL}
    errors = {t.params["backbone"]: t.user_attrs["error"] for t in study.trials
              if t.state == TrialState.FAIL}
    assert "nope" in errors["nope"]
    assert "99" in errors["resnet18"]
    check_consistent(study, mlflow_client)
    parent, _ = study_runs(mlflow_client)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials_failed"] == 3


def test_diverging_trials_stop_the_study(outputs, mlflow_client):
    from sweeper.study import optimize

    cfg = tiny_cfg(outputs)
    with pytest.raises(UserError, match="3 of 3 finished trials failed"):
        # Depths with backbone units to train: a head alone on one epoch of fake data need
        # not reach NaN even at this rate.
        optimize(cfg, {"n_trials": 6, "study_name": "diverge"}, progress="none",
                 arguments=["optim.lr_head=1e12", "optim.lr_backbone=1e12",
                            "freeze.unfrozen=range(4,10)"])
    study = load_study(outputs, "diverge")
    assert len(study.trials) == 3
    assert all(t.state == TrialState.FAIL for t in study.trials)
    assert all("Training diverged" in t.user_attrs["error"] for t in study.trials)
    check_consistent(study, mlflow_client)
    parent, _ = study_runs(mlflow_client, "diverge")
    assert parent.info.status == "FAILED" and "max_failure_rate" in parent.data.tags["error"]


def test_pruned_trials(outputs, mlflow_client):
    from sweeper.study import optimize

    cfg = tiny_cfg(outputs, "trainer.epochs=3")
    result = optimize(cfg, {
        "n_trials": 3, "study_name": "prune", "objectives": {"val_acc": "maximize"},
        # Deterministic: every trial is below 1.01 after its first epoch.
        "pruner": {"_target_": "optuna.pruners.ThresholdPruner", "lower": 1.01},
    }, progress="none")
    study = load_study(outputs, "prune")
    assert result.study.study_name == "prune"
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 3
    assert all(list(t.intermediate_values) == [1] for t in study.trials)
    check_consistent(study, mlflow_client)
    _, children = study_runs(mlflow_client, "prune")
    assert all(len(mlflow_client.get_metric_history(r.info.run_id, "val_acc")) == 1
               for r in children)  # stopped after epoch 1 of 3


def test_pruning_needs_one_objective(outputs):
    from sweeper.study import optimize

    cfg = tiny_cfg(outputs, "hydra/sweeper/pruner=median", "hydra/sweeper/objectives=accuracy_time")
    assert cfg.hydra.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    with pytest.raises(UserError, match="single objective val_acc"):
        optimize(cfg, progress="none")


def test_the_default_study_with_two_objectives_runs_unpruned(outputs, mlflow_client):
    """objectives=accuracy_time keeps working with the default sampler: Optuna takes no
    per-epoch values in a multi-objective study, so the default pruner steps aside."""
    from sweeper.study import optimize

    cfg = tiny_cfg(outputs, "hydra/sweeper/objectives=accuracy_time", "trainer.epochs=2")
    optimize(cfg, {"n_trials": 3, "study_name": "two"}, progress="none")
    study = load_study(outputs, "two")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert [t.params["freeze.unfrozen"] for t in study.trials] == [0, 9, 4]  # the depth plan
    parent, _ = study_runs(mlflow_client, "two")
    assert parent.data.params["pruner"] == "none"
    check_consistent(study, mlflow_client)


def test_pruner_sees_every_epoch_from_the_job(cli, outputs, mlflow_client):
    """Through Hydra's launcher the job reports each epoch to its trial (Hyperband's
    max_resource is ${trainer.epochs}, resolved in the job)."""
    r = cli("hydra.mode=MULTIRUN", "hydra.sweeper.n_trials=4", "trainer.epochs=3",
            "hydra/sweeper/objectives=accuracy", "hydra/sweeper/pruner=hyperband")
    assert r.returncode == 0, r.stderr[-3000:]
    study = load_study(outputs)
    assert study.metric_names == ["val_acc"] and len(study.trials) == 4
    for t in study.trials:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        epochs = 3 if t.state == TrialState.COMPLETE else max(t.intermediate_values)
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1))
    check_consistent(study, mlflow_client)
    parent, _ = study_runs(mlflow_client)
    assert parent.data.params["pruner"].startswith("HyperbandPruner(min_resource=1, max_resource=3")
