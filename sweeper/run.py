"""Entry point: ``python -m sweeper.run [overrides]`` trains one trial; ``-m`` runs a study."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from sweeper import study
from sweeper.config import CONFIG_PATH
from sweeper.errors import entry_point
from sweeper.trial import run_trial


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """Hydra's task function: one trial; under the Optuna sweeper, one trial of its study
    (reported to Optuna every epoch, for pruning). Returns its objectives and final metrics."""
    job = study.hydra_trial(cfg)
    if job is not None:
        return study.run_job(cfg, *job)
    return run_trial(cfg)


if __name__ == "__main__":
    entry_point(main)
