"""Choose the depth: reports made from what MLflow recorded, written and logged as artifacts.

- :func:`make_report` and :func:`show`: a study's table per freeze strategy and depth (keyed
  by the columns :data:`ARM`), its intervals, plots and recommendation by the rule of
  :mod:`sweeper.decision` (:func:`decide_study` applies it to a study's trials,
  :func:`depth_table` and :func:`recommend` put it in a table and words)
  (``_study``; its plots, ``_plots``), written under ``paths.studies`` and logged on the
  study's parent run with the answer as ``recommended.*`` tags and metrics; every finished
  study makes one. :func:`tested_runs` names the runs whose test accuracy a study measures
  when it ends, :func:`candidate_runs` those whose trained parts it keeps until then (of a
  study's trials, :func:`trial_frame`; :func:`find_parent` finds a study's parent run,
  :func:`study_notes` says what a study's trials lack, :func:`importances` are Optuna's
  parameter importances its plot shows); the
  study's parent run records the rule as :data:`RULE_TOLERANCE` and :data:`RULE_CONFIDENCE`;
- :func:`make_design_report`: a designed experiment's figure and table, such as Yosinski et
  al.'s (``_design``), under ``paths.experiments``;
- ``python -m sweeper.report`` makes either from the command line (``__main__``).

Example::

    from sweeper.config import compose
    from sweeper.report import make_report, show

    show(make_report(compose("report")))   # the latest study
"""

from sweeper.report._design import make_design_report
from sweeper.report._plots import importances
from sweeper.report._study import (
    ARM,
    RULE_CONFIDENCE,
    RULE_TOLERANCE,
    Report,
    candidate_runs,
    decide_study,
    depth_table,
    find_parent,
    make_report,
    recommend,
    show,
    study_notes,
    tested_runs,
    trial_frame,
)

__all__ = ["ARM", "RULE_CONFIDENCE", "RULE_TOLERANCE", "Report", "candidate_runs", "decide_study",
           "depth_table", "find_parent", "importances", "make_design_report", "make_report",
           "recommend", "show", "study_notes", "tested_runs", "trial_frame"]
