"""The recommended model as one file and a registered MLflow model: after `python -m sweeper.run -m`
with `hydra.sweeper.register=true`, and from `python -m sweeper.export`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from tests.conftest import CONF, ROOT

# Real images (scikit-learn's digits: grey 8x8, upscaled to 32 px) so that accuracy means
# something; few of them and two epochs so that the study stays short.
DIGITS = ["backbone.weights=none", "dataset=digits", "dataset.train_per_class=20",
          "dataset.val_per_class=10", "dataset.test_per_class=20", "trainer.epochs=2",
          "trainer.batch_size=16", "trainer.device=cpu", "trainer.deterministic=true"]
STUDY = "freeze-resnet18-digits"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _env() -> dict:
    env = {**os.environ, "HYDRA_FULL_ERROR": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(module: str, outputs: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args, f"paths.outputs={outputs}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """One finished study that registered its recommended model (shared by this module's tests)."""
    outputs = tmp_path_factory.mktemp("export") / "outputs"
    done = _run("sweeper.run", outputs, "-m", *DIGITS, "hydra.sweeper.n_trials=3",
                "freeze.unfrozen=range(0,2)", "hydra.sweeper.register=true")
    assert done.returncode == 0, done.stderr[-3000:]
    return outputs


@contextmanager
def _tracking(outputs: Path):
    """MLflow's fluent API (models:/ URIs) on the study's store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{outputs}/mlflow.db")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def _client(outputs: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")


def _recommended_run(outputs: Path) -> str:
    from sweeper.report import make_report

    return make_report(_cfg(outputs)).recommended["run_id"]


def _cfg(outputs: Path, name: str = "config", *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        extra = DIGITS if name == "config" else []
        return compose(name, overrides=[*extra, f"paths.outputs={outputs}", *overrides])


def _fresh_process_accuracy(pt2: Path, images: Path, cwd: Path) -> dict:
    """Accuracy of ``pt2`` on saved test images, in a Python that imports torch and nothing of
    this project (run from a folder outside the checkout, site-packages of the venv only)."""
    code = textwrap.dedent(f"""
        import json, sys, torch
        program = torch.export.load({str(pt2)!r})
        model = program.module()
        images, labels = torch.load({str(images)!r})
        with torch.no_grad():
            pred = torch.cat([model(images[i:i + 64]).argmax(1) for i in range(0, len(images), 64)])
            other = model(torch.randint(0, 256, (3, images.shape[1], 8, 8), dtype=torch.uint8))
        print(json.dumps({{"acc": (pred == labels).float().mean().item(),
                          "other_size": list(other.shape),
                          "sweeper": any(m.split(".")[0] == "sweeper" for m in sys.modules)}}))
    """)
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_study_registers_its_recommended_model(study):
    import mlflow

    client = _client(study)
    run_id = _recommended_run(study)
    versions = client.search_model_versions(f"name = '{STUDY}'")
    assert len(versions) == 1
    v = versions[0]
    assert v.run_id == run_id
    run = client.get_run(run_id)
    tags = v.tags
    assert tags["study"] == STUDY and tags["strategy"] == "depth"
    assert tags["unfrozen"] == run.data.params["freeze.unfrozen"]
    for key in ("val_acc", "test_acc", "train_time_s"):
        assert float(tags[key]) == pytest.approx(run.data.metrics[key], abs=0.01)
    with _tracking(study):
        info = mlflow.models.get_model_info(f"models:/{STUDY}/{v.version}")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, -1, -1]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 10]
    # the study's export folder, named after the trial's run
    assert (study / "exports" / STUDY / run.info.run_name / "model.pt2").is_file()


def test_exported_file_runs_in_a_fresh_process_with_the_logged_test_accuracy(study, tmp_path):
    from sweeper import data as data_mod

    done = _run("sweeper.export", study, "register=false")
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = _recommended_run(study)
    run = _client(study).get_run(run_id)
    folder = study / "exports" / STUDY / run.info.run_name
    assert str(folder / "model.pt2") in done.stdout
    meta = json.loads((folder / "model.json").read_text())
    assert meta["run_id"] == run_id and meta["input"]["shape"][1] == 1
    test = data_mod.load(_cfg(study).dataset).test
    torch.save((test.images, test.labels), tmp_path / "test.pt")
    got = _fresh_process_accuracy(folder / "model.pt2", tmp_path / "test.pt", tmp_path)
    assert not got["sweeper"]
    assert got["acc"] == pytest.approx(run.data.metrics["test_acc"], abs=1e-3)
    assert got["other_size"] == [3, 10]  # any image size: resized inside
    assert (folder / "model.onnx").is_file()
    # exported again without ONNX: the folder holds what model.json lists, no stale model.onnx
    done = _run("sweeper.export", study, "register=false", "onnx=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((folder / "model.json").read_text())["files"] == ["model.pt2"]
    assert not (folder / "model.onnx").exists()


def test_the_registered_version_predicts_through_pyfunc(study):
    import mlflow
    import numpy as np

    with _tracking(study):
        model = mlflow.pyfunc.load_model(f"models:/{STUDY}/1")
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 32, 32), dtype=np.uint8)
    logits = model.predict(images)
    assert logits.shape == (5, 10) and np.isfinite(logits).all()


def test_export_trains_again_a_trial_whose_state_is_gone(study):
    from sweeper.states import StateStore

    client = _client(study)
    kept = set(StateStore.for_study(_cfg(study).paths, STUDY).run_ids())
    exp = client.get_experiment_by_name("sweeper").experiment_id
    parent = client.search_runs([exp], "tags.`sweeper.kind` = 'study'")[0]
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    gone = next(r for r in trials if r.info.run_id not in kept and "val_acc" in r.data.metrics)
    args = (f"run={gone.info.run_id}", "register=false", "onnx=false")
    done = _run("sweeper.export", study, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Weights from: retrained" in done.stdout
    rerun = client.search_runs([exp], f"tags.rerun_of = '{gone.info.run_id}'")
    assert len(rerun) == 1
    # deterministic on the CPU: the same model as the trial's
    assert rerun[0].data.metrics["val_acc"] == gone.data.metrics["val_acc"]
    # kept on the trial's run now: the next export does not train again
    again = _run("sweeper.export", study, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Weights from: artifact kept_state/" in again.stdout


def test_trial_runs_are_named_by_trial_number_and_the_experiment_opens_on_runs(study):
    client = _client(study)
    exp = client.get_experiment_by_name("sweeper")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'study'")[0]
    trials = client.search_runs([exp.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = sorted(r.info.run_name for r in trials)
    depth = {r.info.run_name: r.data.params["freeze.unfrozen"] for r in trials}
    assert names == [f"t{i:03d}-resnet18-u{depth[n]}" for i, n in enumerate(names)]


def test_an_experiment_made_before_gets_its_kind(outputs):
    from omegaconf import OmegaConf

    from sweeper.tracking import Tracker

    uri = f"sqlite:///{outputs}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment("old")
    Tracker._experiments.clear()  # looked up once per process: look again
    Tracker(OmegaConf.create({"uri": uri, "experiment": "old", "artifact_location": None}))
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("old")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_batchnorm_folding_keeps_the_outputs(make_cfg):
    from sweeper.export import Served, fold_batchnorm
    from sweeper.model import build

    cfg = make_cfg()
    net, _ = build(cfg.backbone, 3, 2, None)
    for m in net.modules():  # statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    served = Served(net.eval(), 32, [0.5] * 3, [0.25] * 3)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    folded, count = fold_batchnorm(served, images)
    assert count == 20  # every BatchNorm of a ResNet-18 follows a convolution
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(images), served(images), atol=1e-4)


def _one_message(done: subprocess.CompletedProcess, message: str) -> None:
    """A UserError raised in the job: its message alone (none of Hydra's lines), status 1."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert message in done.stderr
    for hydra_line in ("Traceback", "Error executing job", "HYDRA_FULL_ERROR"):
        assert hydra_line not in done.stderr, done.stderr


def test_export_errors_say_what_to_do(outputs):
    _one_message(_run("sweeper.export", outputs, "run=0123456789abcdef"),
                 "No MLflow run 0123456789abcdef")
    _one_message(_run("sweeper.export", outputs), "No study")
