"""``python -m sweeper.export``: the recommended model of a study (default: the latest) as one
file, registered in MLflow.

``study=NAME`` or ``parent_run=RUN_ID`` picks a study, ``run=RUN_ID`` one trial;
``register=false`` writes the files only (``conf/export.yaml``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sweeper.config import CONFIG_PATH
from sweeper.errors import entry_point
from sweeper.export import export


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    """Export and register the model conf/export.yaml names."""
    done = export(cfg)
    print(f"Model: {done.pt2}" + (f"  (and {done.onnx.name})" if done.onnx else ""))
    print(f"Test accuracy of the file: {done.test_acc:.4f}" + (
        "" if done.logged_test_acc is None else f" (the trial's: {done.logged_test_acc:.4f})"))
    print(f"Weights from: {done.source}")
    if done.model_uri:
        print(f"Registered: {done.model_uri}  (mlflow.pyfunc.load_model('{done.model_uri}'))")
    print(f"Load it anywhere with torch alone:  torch.export.load('{done.pt2}').module()(images)")


if __name__ == "__main__":
    entry_point(main)
