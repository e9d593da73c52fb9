"""sweeper: measure how many layers of a pretrained network to freeze when fine-tuning.

The data flow, and where each step lives: config (``conf/``, found and composed by
:mod:`sweeper.config`) -> :mod:`sweeper.model` (a backbone cut into freeze units, its weights,
the frozen prefix; ``weights=source`` pretrained by :mod:`sweeper.pretrain`) ->
:mod:`sweeper.data` -> :mod:`sweeper.feeds` (the frozen-prefix cache) -> :mod:`sweeper.train`
(the loop; every time metric defined in :mod:`sweeper.timing`) -> :mod:`sweeper.tracking`
(MLflow). :mod:`sweeper.trial` runs one trial end to end; :mod:`sweeper.study` an Optuna
study of trials (its storage: :mod:`sweeper.storage`); :mod:`sweeper.report` turns a study
into a recommendation. Entry points: ``python -m sweeper.run`` (a trial, or ``-m`` a study),
``python -m sweeper.report``, ``python -m sweeper.rerun``.

The public API::

    from sweeper import build, run_trial, optimize, make_report
"""

from sweeper import config  # noqa: F401 - registers the config resolvers before any compose
from sweeper.model import FreezeNet, build
from sweeper.report import make_report
from sweeper.study import optimize
from sweeper.trial import run_trial

__all__ = ["FreezeNet", "build", "make_report", "optimize", "run_trial"]
