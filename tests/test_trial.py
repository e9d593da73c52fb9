"""A trial end to end: what lands in MLflow, every config composes, Hydra's multirun works."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sweeper.config import CONF_DIR as CONF
from sweeper.trial import run_trial

GROUPS = ["backbone", "dataset", "freeze", "optim", "trainer", "tracking", "source"]
# What an option leaves to the user (???): any model of a kind names it.
NEEDS = {"image_folder": ["dataset.root=/data/images"],
         "torchvision": ["backbone.arch=resnet34"], "timm": ["backbone.arch=resnet18"],
         "custom": ["backbone.target=tests.nets.Tiny", "backbone.units=[stem,body]",
                    "backbone.head=fc"]}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes(group, option, outputs):
    overrides = [f"{group}={option}", f"paths.outputs={outputs}", *NEEDS.get(option, [])]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.backbone.num_units > 0
    assert 0 <= cfg.freeze.unfrozen <= cfg.backbone.num_units


def test_trial_on_real_data_logs_a_complete_mlflow_run(make_cfg, mlflow_client):
    cfg = make_cfg("dataset=digits", "dataset.train_per_class=10", "dataset.val_per_class=5",
                   "dataset.test_per_class=5", "trainer.epochs=2", "freeze.unfrozen=3")
    result = run_trial(cfg)
    assert set(result) >= {"val_acc", "train_time_s", "test_acc", "run_id"}
    assert 0 <= result["val_acc"] <= 1 and result["train_time_s"] > 0

    run = mlflow_client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["backbone.name"] == "resnet18"
    assert params["freeze.unfrozen"] == "3"
    assert params["optim.lr_head"] == str(cfg.optim.lr_head)
    assert params["dataset.name"] == "digits"
    assert params["trainer.seed"] == "0"
    metrics = run.data.metrics
    for name in ("val_acc", "test_acc", "train_time_s", "eval_time_s", "time_per_epoch_s",
                 "images_per_s", "trainable_params", "frozen_params", "peak_memory_mb",
                 "train_loss", "train_acc", "epoch_time_s"):
        assert name in metrics, name
    assert metrics["val_acc"] == pytest.approx(result["val_acc"])
    assert metrics["frozen_params"] > 0 and metrics["trainable_params"] > 0
    history = mlflow_client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in history)[:2] == [1, 2]  # one point per epoch (+ the final)
    per_epoch = mlflow_client.get_metric_history(run.info.run_id, "epoch_time_s")
    assert len(per_epoch) == 2
    tags = run.data.tags
    assert len(tags["git_commit"]) in (40, 7) or tags["git_commit"] == "unknown"
    assert tags["git_dirty"] in ("true", "false", "unknown")
    for package in ("torch", "torchvision", "hydra-core", "optuna", "mlflow"):
        assert tags[f"version.{package}"]
    assert "command" in tags and tags["sweeper.kind"] == "trial"
    artifacts = [a.path for a in mlflow_client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts


def test_cli_multirun_logs_one_run_per_value(cli, mlflow_client):
    done = cli("hydra/sweeper=basic", "freeze.unfrozen=0,2", "dataset.train_per_class=4",
               flags=("-m",))
    assert done.returncode == 0, done.stderr
    exp = mlflow_client.get_experiment_by_name("sweeper")
    runs = mlflow_client.search_runs([exp.experiment_id],
                                     filter_string="tags.`sweeper.kind` = 'trial'")
    assert sorted(r.data.params["freeze.unfrozen"] for r in runs) == ["0", "2"]
    for run in runs:
        assert run.info.status == "FINISHED"
        unfrozen = run.data.params["freeze.unfrozen"]
        assert f"freeze.unfrozen={unfrozen}" in run.data.tags["overrides"]
        assert f"freeze.unfrozen={unfrozen}" in run.data.tags["rerun_command"]
        hydra_files = [a.path for a in mlflow_client.list_artifacts(run.info.run_id, ".hydra")]
        assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"} <= set(hydra_files)


def test_cfg_job_shows_the_number_of_freeze_units(cli):
    for backbone, units in [("resnet18", 9), ("vit_b_16", 13), ("convnext_tiny", 19)]:
        done = cli(f"backbone={backbone}", flags=("--cfg", "job"), tiny=False)
        assert done.returncode == 0, done.stderr
        assert f"num_units: {units}" in done.stdout
