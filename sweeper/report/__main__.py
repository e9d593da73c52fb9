"""``python -m sweeper.report``: a study's report (default: the latest) or a design's figure.

``study=NAME`` or ``parent_run=RUN_ID`` picks a study, ``tolerance=0.5`` (accuracy points) and
``confidence=0.9`` change the rule (default: the study's own), ``design=yosinski`` reports a
designed experiment instead (``conf/report.yaml``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sweeper.config import CONFIG_PATH
from sweeper.errors import entry_point
from sweeper.report import make_design_report, make_report, show


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    """Report on a study (the latest by default) or a designed experiment, from conf/report.yaml."""
    if cfg.design:
        make_design_report(cfg, str(cfg.design))
    else:
        show(make_report(cfg, cfg.study, cfg.parent_run, cfg.tolerance, storage=cfg.storage,
                         confidence=cfg.confidence))


if __name__ == "__main__":
    entry_point(main)
