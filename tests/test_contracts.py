"""What code reads back by name stays in step with the configs: param names, paths, unit counts."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from sweeper.config import CONF_DIR, compose
from sweeper.model import FAMILIES
from sweeper.rerun import default_uri
from sweeper.tracking import Param, command_overrides, flatten, train_command
from tests.conftest import ROOT

BACKBONES = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))
GENERIC = ["custom", "timm", "torchvision"]  # any model of a kind: num_units derived from it


def test_every_param_the_readers_look_up_is_a_config_key(outputs):
    """The report and re-runs find trials by these names: renaming the config key must fail here,
    not empty the report."""
    cfg = compose(overrides=[f"paths.outputs={outputs}", "experiment=yosinski"])
    keys = flatten(OmegaConf.to_container(cfg, resolve=False))
    for key in Param:
        assert key in keys, key


def test_every_folder_the_project_writes_is_under_paths(outputs, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(overrides=[f"paths.outputs={outputs}"], return_hydra_config=True)
    paths = cfg.paths
    assert all(str(p).startswith(str(outputs)) for p in paths.values())
    assert cfg.cache.dir.startswith(paths.cache)
    assert cfg.tracking.uri == f"sqlite:///{paths.mlflow_db}"
    assert cfg.tracking.artifact_location == paths.mlartifacts
    assert cfg.hydra.sweeper.storage.startswith(paths.optuna)
    assert cfg.hydra.run.dir.startswith(paths.runs) and cfg.hydra.sweep.dir.startswith(paths.multirun)


def test_rerun_finds_the_store_where_sweeper_outputs_puts_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SWEEPER_OUTPUTS", str(tmp_path / "elsewhere"))
    assert default_uri() == f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/mlflow.db")
    assert default_uri() == "sqlite:////srv/mlflow.db"


def test_every_family_has_a_backbone_config():
    assert BACKBONES == sorted([*FAMILIES, *GENERIC])
    for name in FAMILIES:
        cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")
        assert (cfg.name, cfg.kind, cfg.arch) == (name, "torchvision", name)


@pytest.mark.parametrize("backbone", sorted(FAMILIES))
def test_unit_counts_are_written_once(backbone):
    """conf/backbone/<name>.yaml's num_units is the one count (tests/test_freeze.py checks it
    against the units the code cuts); the README's table and the Yosinski preset follow it."""
    num_units = OmegaConf.load(CONF_DIR / "backbone" / f"{backbone}.yaml").num_units
    readme = (ROOT / "README.md").read_text()
    (row,) = re.findall(rf"^\| `{backbone}` \| (\d+) \|", readme, flags=re.MULTILINE)
    assert int(row) == num_units
    cfg = compose(overrides=["experiment=yosinski", "hydra/sweeper=basic", f"backbone={backbone}"],
                  return_hydra_config=True)
    depths = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)["freeze.transferred"]
    assert depths == f"range(0,{num_units + 1})"  # n = 0..num_units


@pytest.mark.parametrize(("overrides", "name", "num_units"), [
    (["backbone=torchvision", "backbone.arch=resnet34"], "resnet34", 17),
    (["backbone=torchvision", "backbone.arch=resnet18"], "resnet18", 9),  # the hand-cut table
    (["backbone=timm", "backbone.arch=resnet18"], "timm-resnet18", 9),
    (["backbone=custom", "backbone.target=tests.nets.Tiny", "backbone.units=[stem,body]",
      "backbone.head=fc"], "tests.nets.Tiny", 2),
])
def test_other_backbones_derive_their_unit_count_from_the_network(overrides, name, num_units):
    """One source per backbone: a family's file, or the network itself (--cfg job shows the
    resolver, --resolve its value), and the search space and the Yosinski preset follow it."""
    cfg = compose(overrides=[*overrides, "experiment=yosinski", "hydra/sweeper=basic"],
                  return_hydra_config=True)
    assert OmegaConf.to_container(cfg.backbone)["num_units"] == "${sweeper.num_units:}"
    assert (cfg.backbone.name, cfg.backbone.num_units) == (name, num_units)
    depths = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)["freeze.transferred"]
    assert depths == f"range(0,{num_units + 1})"
    space = compose(overrides=overrides, return_hydra_config=True).hydra.sweeper.default_params
    assert space["freeze.unfrozen"] == f"int(interval(0, {num_units}))"


def test_the_train_command_is_built_and_read_in_one_place():
    overrides = ["freeze.unfrozen=3", "optim.lr_head=0.1", "dataset.root='/my images'"]
    command = train_command(overrides)
    assert command.startswith("python -m sweeper.run ")
    assert command_overrides(command) == overrides
    with pytest.raises(ValueError):
        command_overrides("python train.py freeze.unfrozen=3")
