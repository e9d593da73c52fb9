"""Choose the depth: reports made from what MLflow recorded, written and logged as artifacts.

- :func:`make_report` and :func:`show`: a study's table per depth, plots and recommendation
  (``_study``; its plots, ``_plots``), written under ``paths.studies`` and logged on the
  study's parent run; every finished study makes one;
- :func:`make_design_report`: a designed experiment's figure and table, such as Yosinski et
  al.'s (``_design``), under ``paths.experiments``;
- ``python -m sweeper.report`` makes either from the command line (``__main__``).

Example::

    from sweeper.config import compose
    from sweeper.report import make_report, show

    show(make_report(compose("report")))   # the latest study
"""

from sweeper.report._design import make_design_report
from sweeper.report._study import Report, make_report, show

__all__ = ["Report", "make_design_report", "make_report", "show"]
