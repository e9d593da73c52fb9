"""Mistakes a user can make end in one clear message and a non-zero exit, never a stack trace."""

from __future__ import annotations

import pytest
import torch
import torchvision


def _fails_cleanly(done, *expected: str, hydra_own: bool = False) -> None:
    """One message: no trace, and none of Hydra's lines around it (raised before or in the job).
    ``hydra_own``: Hydra's own error composing the config (an option a config group lacks),
    which it ends with its HYDRA_FULL_ERROR hint, before any code of this project runs."""
    assert done.returncode == 1, done.stderr
    for hydra_line in ("Traceback", "Error executing job", *(() if hydra_own else ("HYDRA_FULL_ERROR",))):
        assert hydra_line not in done.stderr, done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr


def _failed_run(mlflow_client, *expected: str):
    exp = mlflow_client.get_experiment_by_name("sweeper")
    runs = mlflow_client.search_runs([exp.experiment_id],
                                     filter_string="tags.`sweeper.kind` = 'trial'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    for text in expected:
        assert text in run.data.tags["error"]
    assert run.data.params["backbone.name"]  # what was recorded before the failure stays


def test_unknown_backbone_lists_the_valid_ones(cli):
    _fails_cleanly(cli("backbone=resnet9000"), "Could not find 'backbone/resnet9000'",
                   "resnet18", "vit_b_16", hydra_own=True)


def test_unknown_dataset_lists_the_valid_ones(cli):
    _fails_cleanly(cli("dataset=mnist"), "Could not find 'dataset/mnist'", "fashion_mnist",
                   hydra_own=True)


def test_a_key_nothing_reads_is_named_not_ignored(cli):
    _fails_cleanly(cli("+backbone._target_=torchvision.models.resnet34"),
                   "backbone._target_ is not a setting of a torchvision backbone",
                   "backbone=torchvision backbone.arch=NAME")
    _fails_cleanly(cli("+dataset.train_per_clas=5"), "dataset.train_per_clas is not a setting")
    _fails_cleanly(cli("backbone=torchvision", "backbone.arch=resnet9000", flags=("-m",)),
                   "is not a torchvision classification model", "resnet34")


def test_unfrozen_out_of_range(cli):
    _fails_cleanly(cli("freeze.unfrozen=10"), "freeze.unfrozen=10 is outside 0..9")


def test_image_folder_missing_or_without_root(cli, tmp_path, outputs):
    _fails_cleanly(cli("dataset=image_folder"), "dataset.root=??? is not a folder")
    _fails_cleanly(cli("dataset=image_folder", f"dataset.root={tmp_path}/nope"),
                   f"dataset.root={tmp_path}/nope is not a folder")
    assert not (outputs / "runs").exists() and not (outputs / "mlartifacts").exists()  # before work


def test_image_folder_with_an_empty_class(cli, tmp_path, mlflow_client):
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "0.png")
    _fails_cleanly(cli("dataset=image_folder", f"dataset.root={tmp_path}/imgs"),
                   "at least one image")  # raised in the job, after its run was recorded
    _failed_run(mlflow_client, "at least one image")
    debug = cli("dataset=image_folder", f"dataset.root={tmp_path}/imgs",
                env={"HYDRA_FULL_ERROR": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # the trace, on request


def test_weights_file_missing_or_not_fitting(cli, tmp_path, mlflow_client):
    _fails_cleanly(cli(f"backbone.weights={tmp_path}/none.pt"), "no such file")
    path = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    _fails_cleanly(cli(f"backbone.weights={path}"), "do not fit backbone resnet18")


def test_download_attempted_offline(cli, tmp_path, mlflow_client):
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9"}
    done = cli("backbone.weights=DEFAULT", env=env)
    _fails_cleanly(done, "Offline, put the file at", str(tmp_path / "torch" / "hub" / "checkpoints"))
    _failed_run(mlflow_client, "Could not download")


@pytest.mark.parametrize("override", ["optim.schedule=linear", "trainer.device=cuda:3",
                                      "freeze.bn_stats=batch"])
def test_bad_values(cli, override):
    if override.startswith("trainer.device") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _fails_cleanly(cli(override), override.split("=")[0])
