"""Entry point: ``python -m sweeper.run [overrides]`` trains one trial; ``-m`` runs a study."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from sweeper import _job
from sweeper.trial import run_trial


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """Hydra's task function: one trial; under the Optuna sweeper, one trial of its study
    (reported to Optuna every epoch, for pruning). Returns its objectives and final metrics."""
    in_study = _job.hydra_trial()
    if in_study is not None:
        sweep, number = in_study
        return _job.run(cfg, _job.settings_in(cfg, sweep), number)
    return run_trial(cfg)


if __name__ == "__main__":
    main()
