"""Entry point: ``python -m sweeper.run [overrides]`` trains one trial; ``-m`` sweeps."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from sweeper.trial import run_trial


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """Hydra's task function: one trial; returns its objectives and final metrics."""
    return run_trial(cfg)


if __name__ == "__main__":
    main()
