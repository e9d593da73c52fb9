"""The report turns a study's MLflow runs into a table with intervals, plots, a recommendation
by the rule of sweeper.decision, and the answer on the parent run."""

from __future__ import annotations

import os
import subprocess
import sys

from sweeper.report import make_report
from sweeper.tracking import Tracker
from sweeper.trial import run_trial


def _study(make_cfg, trials, name="s1"):
    """A parent run with one child run per (depth, lr_head, seed) (what the sweeper logs)."""
    base = ("dataset.train_per_class=6", "trainer.epochs=2")
    cfg = make_cfg(*base)
    parent = Tracker(cfg.tracking).start(name, tags={"sweeper.kind": "study",
                                                     "optuna.study_name": name})
    for n, (depth, lr, seed) in enumerate(trials):
        run_trial(make_cfg(*base, f"freeze.unfrozen={depth}", f"optim.lr_head={lr}",
                           f"trainer.seed={seed}", f"dataset.split_seed={seed}"),
                  parent_run_id=parent.run_id, tags={"optuna.trial_number": str(n)})
    parent.end()
    return cfg, parent.run_id


def test_report_table_intervals_plots_recommendation_and_answer(make_cfg, mlflow_client, outputs):
    cfg, parent = _study(make_cfg, [(0, 0.05, 0), (0, 0.01, 0), (4, 0.05, 0), (4, 0.01, 0),
                                    (4, 0.05, 1), (4, 0.05, 2), (9, 0.05, 0)])
    report = make_report(cfg)  # the latest study
    assert report.parent_run_id == parent
    table = report.table.set_index("unfrozen")
    assert list(table.index) == [0, 4, 9]
    assert list(table.trials) == [2, 4, 1]
    assert table.loc[9, "speedup_vs_full"] == 1.0
    # depth 0: its best learning rate, one trial, a Wilson interval around it
    first = report.trials[(report.trials.unfrozen == 0) & (report.trials.seed == 0)]
    assert table.loc[0, "val_acc"] == first.val_acc.max() and table.loc[0, "repeats"] == 1
    assert table.loc[0, "interval"] == "wilson"
    # depth 4: its learning rate chosen on seed/split 0, then repeated on seeds/splits 1 and 2
    # (a repeat at lr 0.05 counts only if 0.05 won the search)
    chosen = report.trials[(report.trials.unfrozen == 4) & (report.trials.seed == 0)]
    best_lr = chosen.loc[chosen.val_acc.idxmax()].lr_head
    assert table.loc[4, "lr_head"] == best_lr
    assert table.loc[4, "repeats"] == (3 if best_lr == 0.05 else 1)
    for _, row in table.iterrows():
        assert row.val_acc_low <= row.val_acc <= row.val_acc_high
    # the trials that may need a test accuracy: every measurement behind the table's intervals
    from sweeper.report import candidate_runs
    from sweeper.report import tested_runs as tested_by  # pytest would collect test*-names

    kept = report.trials[report.trials.run_id.isin(candidate_runs(report.trials))]
    assert sorted(kept.unfrozen.value_counts().items()) == \
        [(d, int(table.loc[d, "repeats"])) for d in (0, 4, 9)]
    assert all((kept[kept.unfrozen == d].lr_head == table.loc[d, "lr_head"]).all()
               for d in (0, 4, 9))
    rec = report.recommended
    # those that get one: the recommended depth's and the reference's measurements only
    tested = report.trials[report.trials.run_id.isin(tested_by(report.trials))]
    ends = {rec["unfrozen"], int(table[table.status == "reference"].index[0])}
    assert set(tested.unfrozen) == ends
    assert set(tested.run_id) == set(kept[kept.unfrozen.isin(ends)].run_id)
    last = int(report.trials.trial.max())  # a Pareto set adds its trials
    assert set(tested_by(report.trials, pareto=[last])) == \
        set(tested.run_id) | set(report.trials[report.trials.trial == last].run_id)
    assert rec["status"] in ("within", "reference")
    assert "95% CI" in report.explanation
    assert f"Unfreeze the last {rec['unfrozen']} units" in report.explanation
    assert "freeze.unfrozen=" in rec["command"]
    folder = outputs / "studies" / "s1" / "report"
    for f in ("report.md", "pareto.png", "depth.png", "depths.csv"):
        assert (folder / f).is_file(), f
    text = (folder / "report.md").read_text()
    assert "## Recommendation" in text and "Depths without a complete trial" in text
    logged = {a.path for a in mlflow_client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/pareto.png", "report/depth.png"} <= logged
    # the answer, machine-readable, on the parent run
    run = mlflow_client.get_run(parent)
    assert run.data.tags["recommended.unfrozen"] == str(rec["unfrozen"])
    assert float(run.data.tags["recommended.lr_head"]) == rec["lr_head"]
    assert ("recommended.lr_backbone" in run.data.tags) == (rec["unfrozen"] > 0)
    assert run.data.metrics["recommended.val_acc_mean"] == rec["val_acc"]
    assert run.data.metrics["recommended.val_acc_ci_low"] == rec["val_acc_low"]
    assert run.data.metrics["recommended.val_acc_ci_high"] == rec["val_acc_high"]
    assert run.data.metrics["recommended.test_acc"] == rec["test_acc"]
    assert run.data.metrics["recommended.train_time_s"] == rec["train_time_s"]


def test_report_with_little_data_says_what_is_missing(make_cfg, outputs):
    cfg, _ = _study(make_cfg, [(1, 0.05, 0)], name="tiny")
    report = make_report(cfg, study="tiny", tolerance=0.5, confidence=0.9)
    assert report.recommended["unfrozen"] == 1
    assert report.decision.tolerance == 0.5 and report.decision.confidence == 0.9
    joined = " ".join(report.notes)
    assert "Full fine-tuning" in joined and "measured once" in joined


def test_importances_too_rough_for_a_parameter_say_so_on_the_plot_not_as_a_warning():
    """Optuna's evaluator warns when a parameter (a conditional one: lr_backbone exists only
    once units train) has too few trials in part of its range; the report's output shows no
    Python warning, and the importance plot's title names the parameter instead."""
    import warnings

    import optuna

    from sweeper.report import importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr_head", 1e-3, 0.3, log=True)
                   + (t.suggest_float("lr_backbone", 1e-4, 0.1, log=True) if t.number == 0 else 0),
                   n_trials=6)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        found, rough = importances(study)
    assert set(found) == {"lr_head", "lr_backbone"}
    assert rough == ["lr_backbone"]
    assert not [w for w in said if "regimes" in str(w.message)]


def test_report_errors_are_one_message(outputs):
    env = {**os.environ, "HYDRA_FULL_ERROR": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    for pick, message in (("study=nosuch", "No study named 'nosuch'"),
                          ("parent_run=nosuch", "No MLflow run nosuch")):
        done = subprocess.run([sys.executable, "-m", "sweeper.report", pick,
                               f"paths.outputs={outputs}"], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 1, done.stderr[-3000:]
        assert message in done.stderr
        for hydra_line in ("Traceback", "Error executing job", "HYDRA_FULL_ERROR"):
            assert hydra_line not in done.stderr, done.stderr


def _frame(rows):
    """A study's trial frame (as ``trial_frame`` makes it) of (strategy, unfrozen, units, val_acc)
    rows: one trial each, all on seed and split 0 at the same learning rates."""
    import pandas as pd

    from sweeper.tracking import State

    return pd.DataFrame([{
        "trial": n, "run_id": f"run{n}", "state": State.COMPLETE, "strategy": strategy,
        "unfrozen": unfrozen, "num_units": 9, "schedule": strategy, "units": units,
        "lr_head": 0.05, "lr_backbone": 0.005, "seed": 0, "split_seed": 0,
        "setting": (("optim.lr_head", 0.05),), "val_acc": acc, "test_acc": float("nan"),
        "train_time_s": 1.0 + units, "trainable_params": 100.0, "val_images": 100.0,
        "command": "", "order": n,
    } for n, (strategy, unfrozen, units, acc) in enumerate(rows)])


def _answer(rows):
    from sweeper.report import decide_study, depth_table, recommend, study_notes

    trials = _frame(rows)
    decision = decide_study(trials)
    rec, text = recommend(depth_table(trials, decision), decision)
    return decision, rec, text, " ".join(study_notes(trials, decision))


def test_an_answer_that_compared_nothing_cheaper_is_not_settled():
    # hparams_search=learning_rates freeze.unfrozen=3: depths 0-2 never measured
    decision, rec, text, notes = _answer([("depth", 3, 3, 0.6), ("depth", 3, 3, 0.5)])
    assert not decision.settled and not rec["settled"]
    assert "settled: no cheaper" not in text
    assert "The study measured only depth 3, so it compares nothing cheaper" in text
    assert "Depths without a complete trial: [0, 1, 2, 4, 5, 6, 7, 8, 9]." in notes
    # a study that measured depth 0 (the cheapest there is) and found it worse is settled
    decision, rec, text, _ = _answer([("depth", 0, 0, 0.2), ("depth", 3, 3, 0.9)])
    assert decision.settled and "The answer is settled" in text


def test_strategies_report_counts_every_strategy_s_depths():
    # hparams_search=strategies, one trial per arm: none cheaper than the recommended one
    decision, rec, text, notes = _answer([
        ("depth", 2, 2, 0.9), ("progressive", 5, 4, 0.5), ("gradual", 6, 3, 0.5)])
    assert not decision.settled and "settled: no cheaper" not in text
    assert ("The study measured only depth 2, freeze=gradual unfrozen=6, freeze=progressive "
            "unfrozen=5, so it compares nothing cheaper") in text
    assert "Depths without a complete trial: [0, 1, 3, 4, 7, 8, 9]." in notes


def test_advice_for_an_unsettled_grid_study_is_not_more_trials_of_it():
    from sweeper.report import decide_study, depth_table, recommend

    trials = _frame([("depth", 0, 0, 0.85), ("depth", 9, 9, 0.86)])  # one trial per depth
    decision = decide_study(trials)
    table = depth_table(trials, decision)
    assert not decision.settled
    _, text = recommend(table, decision, "GridSampler(seed=0)", "freeze-resnet18-fake")
    assert "Raise hydra.sweeper.n_trials" not in text
    assert ("The grid sampler runs every combination once, so raising hydra.sweeper.n_trials "
            "adds no trial: for a firmer answer run the default study "
            "(hydra/sweeper/sampler=depth)") in text
    assert "hydra.sweeper.study_name=freeze-resnet18-fake-depth" in text
    _, text = recommend(table, decision, "DepthSampler(seed=0)", "freeze-resnet18-fake")
    assert text.endswith("Raise hydra.sweeper.n_trials and run the same command again: the "
                         "study resumes.")


def test_a_study_name_not_found_lists_the_studies_there(make_cfg):
    """report study=NAME for a name the store lacks names the studies it has."""
    import pytest

    from sweeper.errors import UserError
    from sweeper.report import find_parent

    cfg = make_cfg()
    tracker = Tracker(cfg.tracking)
    for name in ("freeze-a", "freeze-b"):
        tracker.start(name, tags={"sweeper.kind": "study", "optuna.study_name": name}).end()
    with pytest.raises(UserError, match=r"No study named 'nosuch' .* Its studies: freeze-a, "
                                        r"freeze-b \(study=NAME\)\."):
        find_parent(tracker, study="nosuch")
