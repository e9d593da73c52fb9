"""The default study end to end, twice on fresh outputs: the same trials in the same order, the
same recommendation, its answer on the parent run, intervals and pruned trials in the report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import ROOT, TINY
from tests.test_study import STUDY, check_consistent, load_study, study_runs

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# Depths 0..3 of the default space, two learning-rate trials each (8), then 5 trials for
# repeats; 3 epochs. Every second search trial is pruned after epoch 2: with margin -100 points
# any trial is "behind" an earlier one of its depth, which exercises pruning deterministically.
SMALL = ["freeze.unfrozen=range(0,4)", "hydra.sweeper.n_trials=13", "trainer.epochs=3",
         "dataset.val_per_class=12", "dataset.size=150", "hydra.sweeper.pruner.margin=-100",
         "hydra.sweeper.pruner.n_warmup_steps=1"]


def study_once(outputs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "sweeper.run", "-m", *TINY, *SMALL,
                           f"paths.outputs={outputs}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def sequence(study: optuna.Study) -> list[tuple]:
    return [(t.state, tuple(sorted(t.params.items())), t.values) for t in study.trials]


def test_the_same_command_twice_gives_the_same_study_and_answer(tmp_path):
    runs = {}
    for name in ("first", "second"):
        outputs = tmp_path / name / "outputs"
        done = study_once(outputs)
        assert done.returncode == 0, done.stderr[-4000:]
        client = MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")
        runs[name] = (outputs, load_study(outputs), client, done.stdout)
    (a_out, a, a_client, a_text), (_, b, b_client, b_text) = runs["first"], runs["second"]
    assert sequence(a) == sequence(b)  # parameters, states and accuracies, trial by trial

    # the plan: every depth, two learning-rate trials each on seed/split 0, then repeats
    ps = [t.params for t in a.trials]
    assert sorted(p["freeze.unfrozen"] for p in ps[:8]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(p["trainer.seed"] == p["dataset.split_seed"] == 0 for p in ps[:8])
    assert len(ps) <= 13 and all(p["trainer.seed"] == p["dataset.split_seed"] > 0 for p in ps[8:])
    assert [t.state for t in a.trials[4:8]] == [TrialState.PRUNED] * 4  # the second round
    assert all(list(t.intermediate_values) == [1, 2] for t in a.trials[4:8])
    assert a.metric_names == ["val_acc"]
    check_consistent(a, a_client)

    tags, metrics = [], []
    for client in (a_client, b_client):
        parent, children = study_runs(client, STUDY)
        assert parent.info.status == "FINISHED"
        tags.append({k: v for k, v in parent.data.tags.items() if k.startswith("recommended.")})
        metrics.append({k: v for k, v in parent.data.metrics.items()
                        if k.startswith("recommended.") and k != "recommended.train_time_s"})
        assert sum(r.data.tags.get("state") == "pruned" and r.info.status == "KILLED"
                   for r in children) == 4
    assert tags[0] == tags[1] and metrics[0] == metrics[1]
    assert {"recommended.unfrozen", "recommended.lr_head", "recommended.settled"} <= set(tags[0])
    assert {"recommended.val_acc_mean", "recommended.val_acc_ci_low",
            "recommended.val_acc_ci_high", "recommended.test_acc"} <= set(metrics[0])
    low, mean, high = (metrics[0][f"recommended.val_acc_{k}"] for k in ("ci_low", "mean", "ci_high"))
    assert low <= mean <= high
    depth = int(tags[0]["recommended.unfrozen"])
    assert (depth > 0) == ("recommended.lr_backbone" in tags[0])

    # the printed recommendation gives the interval; the report's table shows one per depth
    line = next(x for x in a_text.splitlines() if x.startswith("Recommendation:"))
    assert f"Unfreeze the last {depth} units" in line and "95% CI" in line
    other = next(x for x in b_text.splitlines() if x.startswith("Recommendation:"))
    assert line.split(" s of training")[0].rsplit(",", 1)[0] == \
        other.split(" s of training")[0].rsplit(",", 1)[0]  # all but the measured time
    report = (a_out / "studies" / STUDY / "report" / "report.md").read_text()
    assert "| unfrozen | lr_head | lr_backbone | repeats | val acc (mean) | 95% CI |" in report
    assert "4 trials pruned" in report
    assert (a_out / "studies" / STUDY / "report" / "depth.png").is_file()
