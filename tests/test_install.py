"""Installed from a wheel, run from any folder: every command works with the packaged configs,
the plugin is found, and a user's own config folder adds options with names of their own."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import ROOT

# A user's own folder: a dataset (a subset of digits, named "mine"), a backbone of their own
# module, and an experiment in a further folder that their own primary config adds with
# hydra.searchpath.
USER_FILES = {
    "dataset/mine.yaml": """\
defaults:
  - digits
  - _self_
name: mine
classes: [0, 1, 2]
train_per_class: 10
val_per_class: 5
test_per_class: 5
""",
    "backbone/mynet.yaml": """\
defaults:
  - custom
  - _self_
name: mynet
target: user_nets.Tiny
units: [stem, body]
head: fc
""",
    "train.yaml": """\
defaults:
  - config
  - _self_
hydra:
  searchpath:
    - file://{more}
""",
    "more/experiment/quick.yaml": "# @package _global_\ntrainer:\n  epochs: 1\n",
}


def user_folder(root: Path) -> Path:
    conf = root / "myconf"
    for name, text in USER_FILES.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text.format(more=conf / "more"))
    shutil.copy(ROOT / "tests" / "nets.py", root / "user_nets.py")  # the user's own module
    return conf


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in
           ("PYTHONPATH", "MLFLOW_TRACKING_URI", "SWEEPER_OUTPUTS", "HYDRA_FULL_ERROR")}
    return env


def _run(python: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([python, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_a_user_config_folder_adds_options_with_their_own_names(tmp_path, outputs):
    """From the checkout: --config-dir adds a dataset and a backbone beside the packaged ones,
    their names label the runs, and the printed re-run command keeps the folder."""
    conf = user_folder(tmp_path)
    py = sys.executable
    done = _run(py, "-m", "sweeper.run", f"--config-dir={conf}", "dataset=mine", "backbone=mynet",
                "trainer.epochs=1", "trainer.device=cpu", f"paths.outputs={outputs}",
                cwd=tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("sweeper").experiment_id])
    assert run.info.status == "FINISHED", done.stderr[-2000:]
    assert run.info.run_name == "mynet-mine-unfrozen2"
    assert run.data.params["dataset.name"] == "mine" and run.data.params["backbone.name"] == "mynet"
    assert run.data.params["backbone.num_units"] == "2"
    command = run.data.tags["rerun_command"]
    assert command.startswith(f"python -m sweeper.run --config-dir={conf} ")
    # hydra.searchpath in the user's own primary config adds a further folder.
    done = _run(py, "-m", "sweeper.run", f"--config-dir={conf}", "--config-name=train",
                "experiment=quick", "dataset=mine", "--cfg", "job", cwd=tmp_path)
    assert "epochs: 1" in done.stdout and "name: mine" in done.stdout


def _wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the working tree (the checkout is left untouched)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("sweeper", "conf", "hydra_plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
             str(src)]
    done = subprocess.run([*build, "--no-build-isolation"], capture_output=True, text=True)
    if done.returncode != 0:  # no setuptools in this environment: pip fetches the build backend
        done = subprocess.run(build, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("sweeper-*.whl")
    return wheel


def _venv(tmp_path: Path, wheel: Path) -> str:
    """A fresh virtualenv with the wheel installed; it borrows this environment's installed
    dependencies (a .pth naming their folders: the .pth files there, such as the editable
    install's, are not run), instead of installing them again."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "zz_dependencies.pth").write_text("\n".join(deps) + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return python


def test_installed_from_a_wheel_every_command_works_from_any_folder(tmp_path):
    wheel = _wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "sweeper/conf/config.yaml" in names and "sweeper/conf/backbone/timm.yaml" in names
    assert "sweeper/conf/hydra/sweeper/optuna.yaml" in names
    assert "hydra_plugins/sweeper_optuna/__init__.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, as Hydra needs
    packaged = {n for n in names if n.startswith("sweeper/") and n.endswith(".py")}
    here = {str(p.relative_to(ROOT)) for p in (ROOT / "sweeper").rglob("*.py")}
    assert here <= packaged, f"not in the wheel: {sorted(here - packaged)}"  # pyproject's list

    python = _venv(tmp_path, wheel)
    work = tmp_path / "work"  # a folder with no checkout
    work.mkdir()
    conf = user_folder(work)
    where = _run(python, "-c", "import sweeper, hydra_plugins.sweeper_optuna as p; "
                 "print(sweeper.__file__); print(p.__file__)", cwd=work).stdout
    assert str(ROOT) not in where and where.count(str(tmp_path / "venv")) == 2, where

    run = ("-m", "sweeper.run")
    helped = _run(python, *run, "--help", cwd=work).stdout
    assert "== Configuration groups ==" in helped
    assert "custom" in helped and "timm" in helped and "split_folder" in helped
    job = _run(python, *run, "backbone=torchvision", "backbone.arch=resnet34", "--cfg", "job",
               "--resolve", cwd=work).stdout
    assert "num_units: 17" in job

    # The issue's own commands, as a user types them (on fewer digits, for time).
    small = ("dataset.train_per_class=10", "dataset.val_per_class=5", "dataset.test_per_class=5")
    _run(python, *run, "trainer.epochs=1", "dataset=digits", "backbone=torchvision",
         "backbone.arch=resnet34", "backbone.weights=none", *small, cwd=work)
    _run(python, *run, "-m", "hydra.sweeper.n_trials=2", "trainer.epochs=1", "dataset=digits",
         "backbone=timm", "backbone.arch=resnet18", "backbone.weights=none", *small, cwd=work)
    # A user's own dataset file, with its own name.
    _run(python, *run, f"--config-dir={conf}", "dataset=mine", "trainer.epochs=1",
         "backbone.weights=none", cwd=work)

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/outputs/mlflow.db")  # ./outputs
    runs = client.search_runs([client.get_experiment_by_name("sweeper").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["resnet34-digits-unfrozen2"].info.status == "FINISHED"
    (study,) = [r for r in runs if r.data.tags.get("sweeper.kind") == "study"]
    assert study.info.status == "FINISHED" and study.data.tags["optuna.study_name"] == \
        "freeze-timm-resnet18-digits"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    mine = by_name["resnet18-mine-unfrozen2"]
    assert mine.info.status == "FINISHED" and mine.data.params["dataset.name"] == "mine"

    report = _run(python, "-m", "sweeper.report", cwd=work).stdout
    assert "Train it:" in report and "timm" in report
    exported = _run(python, "-m", "sweeper.export", cwd=work).stdout  # the study's model
    assert "outputs/exports/freeze-timm-resnet18-digits/" in exported and "models:/" in exported
    again = _run(python, "-m", "sweeper.rerun", mine.info.run_id, cwd=work)
    assert "val_acc: original" in again.stderr
    printed = shlex.split(mine.data.tags["rerun_command"])  # works as printed
    assert printed[:3] == ["python", "-m", "sweeper.run"]
    _run(python, *printed[1:], cwd=work)
    assert len(client.search_runs([client.get_experiment_by_name("sweeper").experiment_id],
                                  "attributes.run_name = 'resnet18-mine-unfrozen2'")) == 3
