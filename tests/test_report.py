"""The report turns a study's MLflow runs into a table, plots and a recommendation."""

from __future__ import annotations

from sweeper.report import make_report
from sweeper.tracking import Tracker
from sweeper.trial import run_trial


def _study(make_cfg, depths, name="s1", lrs=(0.05,)):
    """A parent run with one child trial per depth (what the Optuna sweeper logs)."""
    cfg = make_cfg("dataset.train_per_class=6", "trainer.epochs=2")
    parent = Tracker(cfg.tracking).start(name, tags={"sweeper.kind": "study",
                                                     "optuna.study_name": name})
    n = 0
    for depth in depths:
        for lr in lrs:
            run_trial(make_cfg("dataset.train_per_class=6", "trainer.epochs=2",
                               f"freeze.unfrozen={depth}", f"optim.lr_head={lr}"),
                      parent_run_id=parent.run_id, tags={"optuna.trial_number": str(n)})
            n += 1
    parent.end()
    return cfg, parent.run_id


def test_report_table_plots_and_recommendation(make_cfg, mlflow_client, outputs):
    cfg, parent = _study(make_cfg, [0, 4, 9], lrs=(0.05, 0.01))
    report = make_report(cfg)  # the latest study
    assert report.parent_run_id == parent
    table = report.table.set_index("unfrozen")
    assert list(table.index) == [0, 4, 9]
    assert (table.trials == 2).all()
    assert table.loc[9, "speedup_vs_full"] == 1.0
    best = report.trials.groupby("unfrozen").val_acc.max()
    assert (table.best_val_acc == best).all()
    # the rule: fastest depth within 1 point of the best
    ok = table[table.best_val_acc >= table.best_val_acc.max() - 0.01]
    assert report.recommended["unfrozen"] == ok.train_time_s.idxmin()
    assert "freeze.unfrozen=" in report.recommended["command"]
    folder = outputs / "studies" / "s1" / "report"
    for f in ("report.md", "pareto.png", "depth.png", "depths.csv"):
        assert (folder / f).is_file(), f
    text = (folder / "report.md").read_text()
    assert "## Recommendation" in text and "Depths without a complete trial" in text
    logged = {a.path for a in mlflow_client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/pareto.png", "report/depth.png"} <= logged


def test_report_with_little_data_says_what_is_missing(make_cfg, outputs):
    cfg, parent = _study(make_cfg, [1], name="tiny")
    report = make_report(cfg, study="tiny")
    assert report.recommended["unfrozen"] == 1
    joined = " ".join(report.notes)
    assert "Full fine-tuning" in joined and "Fewer than 3 complete trials" in joined
