"""An Optuna study over freeze depth and learning rates: run, resumed, shared, tracked in MLflow.

- :func:`optimize` runs or resumes a study from Python; ``python -m sweeper.run -m`` runs the
  same one through Hydra (:class:`HydraSweeper`, registered by ``hydra_plugins/sweeper_optuna``);
  both drive a :class:`StudyRunner` (``_runner``), which ends every finished study with its
  report (:mod:`sweeper.report`); with Hydra's basic launcher, :class:`TrialConfigs` gives
  each trial's job the config Hydra would compose for it, mostly by copying the last one;
- in each job, :func:`hydra_trial` and :func:`run_job` run one trial of the study: they report
  its epochs for pruning, keep its heartbeat and tell Optuna the result (``_job``; a trial's
  heartbeat, failure and loss: ``_trials``);
- :class:`CheckBeforeWork`, a Hydra callback, checks the config (:mod:`sweeper.validate`)
  and the study's settings (:func:`check_settings`) before Hydra creates a folder;
- the settings: :func:`check_settings` (``_schema``: the one place that validates and completes
  them, hydra-optuna-sweeper's keys included), :func:`default_settings`, :func:`settings_in`,
  :func:`search` (the space a sweep samples), :func:`make_sampler`, :func:`make_pruner`
  (``_settings``) and the search space's grammar, :func:`parse_space` (``_space``);
- the default study's :class:`DepthSampler` (every depth, a learning-rate search in each,
  repeats of the depths in contention, by the rule of :mod:`sweeper.decision`) and
  :class:`DepthPruner` (``_depth``);
- the MLflow side (a parent run per study, a child run per trial, the Pareto table) is
  ``_mlflow``; the live table or log lines, ``_progress``.

Example::

    from sweeper.config import compose
    from sweeper.study import optimize

    result = optimize(compose(overrides=["hydra.sweeper.n_trials=6"], return_hydra_config=True))
    print(result.parent_run_id, result.pareto)
"""

from sweeper.study._depth import DepthPruner, DepthSampler
from sweeper.study._hydra import CheckBeforeWork, HydraSweeper, TrialConfigs
from sweeper.study._job import hydra_trial, run_job
from sweeper.study._runner import StudyResult, StudyRunner, optimize
from sweeper.study._schema import check_settings
from sweeper.study._settings import (
    Search,
    default_settings,
    make_pruner,
    make_sampler,
    search,
    settings_in,
)
from sweeper.study._space import Space, parse_space

__all__ = ["CheckBeforeWork", "DepthPruner", "DepthSampler", "HydraSweeper", "Search", "Space",
           "StudyResult", "StudyRunner", "TrialConfigs", "check_settings", "default_settings",
           "hydra_trial", "make_pruner", "make_sampler", "optimize", "parse_space", "run_job",
           "search", "settings_in"]
