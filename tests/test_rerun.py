"""Any logged trial can be re-run from MLflow to the same validation accuracy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from sweeper.errors import UserError
from sweeper.rerun import apply_overrides, main, rerun
from sweeper.trial import run_trial


def test_rerun_reproduces_val_acc_exactly(make_cfg, outputs, mlflow_client, capfd):
    cfg = make_cfg("dataset=digits", "dataset.train_per_class=10", "dataset.val_per_class=10",
                   "dataset.test_per_class=5", "trainer.epochs=2", "trainer.deterministic=true",
                   "freeze.unfrozen=4")
    original = run_trial(cfg)
    capfd.readouterr()
    again = rerun(original["run_id"], f"sqlite:///{outputs}/mlflow.db")
    assert "Downloading artifacts" not in capfd.readouterr().err  # no progress bar for a file
    assert again["val_acc"] == original["val_acc"]
    assert again["test_acc"] == original["test_acc"]
    new = mlflow_client.get_run(again["run_id"])
    assert new.data.tags["rerun_of"] == original["run_id"]
    assert new.info.experiment_id == mlflow_client.get_run(original["run_id"]).info.experiment_id
    assert new.data.params == mlflow_client.get_run(original["run_id"]).data.params


def _rerun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "sweeper.rerun", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_rerun_of_a_study_parent_run_is_refused(make_cfg, outputs, mlflow_client):
    from sweeper.tracking import Tracker

    cfg = make_cfg()  # a study's parent run, as a sweep starts it: no freeze depth of its own
    parent = Tracker(cfg.tracking).start("s1", tags={"sweeper.kind": "study",
                                                     "optuna.study_name": "s1"})
    parent.params({"n_trials": 2})
    parent.end()
    done = _rerun(parent.run_id, "--tracking-uri", f"sqlite:///{outputs}/mlflow.db")
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"Run {parent.run_id} (s1) is not a trial: pass a trial's run id" in done.stderr
    assert "Traceback" not in done.stderr
    runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("sweeper").experiment_id])
    assert [r.info.run_id for r in runs] == [parent.run_id]  # nothing trained, nothing logged


def test_rerun_needs_only_a_run_id(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "the following arguments are required: run_id\n" in capsys.readouterr().err


def test_rerun_of_an_unknown_run_says_so(outputs):
    done = _rerun("0123abcd", "--tracking-uri", f"sqlite:///{outputs}/mlflow.db")
    assert done.returncode == 1
    assert "No MLflow run 0123abcd" in done.stderr and "Traceback" not in done.stderr


def test_an_override_of_a_key_the_run_lacks_is_refused_not_ignored():
    """A typo in a re-run's change is named with the key it most likely means; +key adds."""
    logged = OmegaConf.create({"trainer": {"epochs": 2, "seed": 0}, "optim": {"lr_head": 0.05}})
    changed = apply_overrides(logged, ["trainer.epochs=1", "+trainer.note=x"])
    assert changed.trainer.epochs == 1 and changed.trainer.note == "x"
    with pytest.raises(UserError, match=r"trainer\.epoch is not in the run's config \(did you "
                                        r"mean trainer\.epochs\?\)"):
        apply_overrides(logged, ["trainer.epoch=1"])
    with pytest.raises(UserError, match="nosuchkey is not in the run's config: .* "
                                        r"\+nosuchkey=1"):
        apply_overrides(logged, ["nosuchkey=1"])
