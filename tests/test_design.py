"""The Yosinski et al. (2014) preset runs its four treatments and draws the paper's figure."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from sweeper.report import make_design_report

from .conftest import CONF  # noqa: TID252

SMALL = ["backbone.weights=source", "dataset=digits", "dataset.classes=[5,6,7,8,9]",
         "dataset.train_per_class=10", "dataset.val_per_class=5", "dataset.test_per_class=5",
         "dataset@source.dataset=digits", "source.dataset.train_per_class=20",
         "source.dataset.val_per_class=5", "source.dataset.test_per_class=10",
         "source.trainer.epochs=1", "trainer.epochs=1", "trainer.batch_size=16",
         "trainer.device=cpu"]


def test_yosinski_experiment_treatments_and_figure(cli, outputs, mlflow_client):
    done = cli("hydra/sweeper=basic", "experiment=yosinski", "treatment=AnB,BnB_plus",
               "freeze.transferred=0,5", "trainer.seed=0", *SMALL, flags=("-m",), tiny=False)
    assert done.returncode == 0, done.stderr
    exp = mlflow_client.get_experiment_by_name("yosinski")
    runs = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'trial'")
    got = {(r.data.params["design.treatment"], r.data.params["freeze.transferred"],
            r.data.params["freeze.unfrozen"]) for r in runs}
    # AnB: n units transferred and frozen -> 9 - n trainable; BnB+: everything trains
    assert got == {("AnB", "0", "9"), ("AnB", "5", "4"), ("BnB+", "0", "9"), ("BnB+", "5", "9")}
    sources = {r.data.tags["pretrain_run_id"] for r in runs}
    assert len(sources) == 2, "A and B are pretrained once each"

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("report", overrides=[f"paths.outputs={outputs}", "design=yosinski"])
    table, folder = make_design_report(cfg, "yosinski")
    assert set(table[("mean", "AnB")].index) == {0, 5}
    assert (folder / "transfer.png").is_file()
    text = (folder / "report.md").read_text()
    assert "| 5 |" in text and "Base B" in text and "not found" not in text
