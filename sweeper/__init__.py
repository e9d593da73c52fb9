"""sweeper: measure how many layers of a pretrained network to freeze when fine-tuning.

The data flow, one module each: config (``conf/``) -> :mod:`sweeper.backbones` (families cut
into freeze units) + :mod:`sweeper.weights` / :mod:`sweeper.pretrain` -> :mod:`sweeper.freeze`
(the frozen prefix) -> :mod:`sweeper.data` -> :mod:`sweeper.cache` (frozen-prefix outputs)
-> :mod:`sweeper.train` (the loop and its timing) -> :mod:`sweeper.tracking` (MLflow);
:mod:`sweeper.trial` ties one trial together and :mod:`sweeper.run` is the Hydra entry point.
:mod:`sweeper.study` runs an Optuna study over trials (``optimize``), :mod:`sweeper.report`
turns a study into a recommendation, :mod:`sweeper.rerun` re-runs a logged trial.
"""

from sweeper import config  # noqa: F401 - registers the config resolvers before any compose
from sweeper.freeze import FreezeNet
from sweeper.model import build
from sweeper.trial import run_trial

__all__ = ["FreezeNet", "build", "run_trial"]
