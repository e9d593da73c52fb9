"""Run or resume an Optuna study over freeze depth and learning rates, tracked in MLflow.

The Hydra sweeper (``python -m sweeper.run -m``) and :func:`optimize` (from Python) share
this engine. ``n_trials`` is the study's total: every sweep on the same storage and study
name works on the same study until it holds ``n_trials`` trials, then stops, so running the
same command again resumes an interrupted study and never runs it past its total. Each of
the ``n_jobs`` workers asks for the next trial as soon as its last one ends (no batches).
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from sweeper import timing
from sweeper.config import task_config
from sweeper.errors import Interrupted, UserError, interruption
from sweeper.report import (
    RULE_CONFIDENCE,
    RULE_TOLERANCE,
    candidate_runs,
    make_report,
    show,
    tested_runs,
    trial_frame,
)
from sweeper.states import StateStore
from sweeper.storage import StudyLock, is_url, journal_path, open_storage, storage_label
from sweeper.study import _trials
from sweeper.study._depth import PLAN
from sweeper.study._job import SweptHere, kept_states, run_job, swept_here
from sweeper.study._mlflow import (
    fail_trial_runs,
    pareto_trials,
    reopen,
    start_parent,
    summarize,
)
from sweeper.study._progress import Progress
from sweeper.study._schema import check_settings, sampler_label, sampler_target
from sweeper.study._settings import (
    apply_overrides,
    default_settings,
    describe,
    make_pruner,
    make_sampler,
    one_at_a_time,
    search,
    settings_in,
)
from sweeper.tracking import Run, State, Tracker, config_params
from sweeper.trial import evaluate_kept
from sweeper.validate import check_config

log = logging.getLogger("sweeper.study")

optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happened

# When a sweep deletes the kept trained parts no report can need: once they hold this many
# bytes, or twice what the last pruning left, whichever is more (each pruning reads every run
# of the study from MLflow, so it is not worth doing for a few files).
PRUNE_ABOVE_BYTES = 2 * 2**30
_AGAIN = " again, as planned: "  # a retry's plan (user attr): "trial N again, as planned: ..."
_TESTED_S = "sweeper:test_eval_s"  # study system attr: seconds its end-of-study test evaluations took

# A launch runs trial ``number`` with these Hydra overrides and returns when it has ended;
# it raises if the job failed in a way the job itself could not record.
Launch = Callable[[int, list[str]], None]


@dataclass
class StudyResult:
    """What a sweep leaves: the study, its MLflow parent run and the Pareto set."""

    study: optuna.Study
    parent_run_id: str
    pareto: list[dict[str, Any]]
    complete: bool


class StudyRunner:
    """One sweep process's part of a study: asks, launches, watches, and finishes it.

    ``settings`` is the resolved ``hydra.sweeper`` node; ``cfg`` the task config (for
    MLflow, and for conditions on keys the space does not sample); ``arguments`` the
    command-line overrides of the task (sweeps among them join the search space).
    """

    def __init__(self, settings: DictConfig, cfg: DictConfig, launch: Launch,
                 arguments: Sequence[str] = ()) -> None:
        self.s = settings
        self.cfg = cfg
        self.launch = launch
        self.arguments = list(arguments)
        self.objectives: dict[str, str] = {str(k): str(v) for k, v in settings.objectives.items()}
        if not self.objectives:
            raise UserError("hydra.sweeper.objectives is empty: name at least one metric of "
                            "the trial (val_acc, train_time_s, test_acc...) and its direction.")
        self.names = list(self.objectives)
        self.name = str(settings.study_name)
        self.storage_spec = str(settings.storage)
        if not is_url(self.storage_spec):
            self.storage_spec = str(journal_path(self.storage_spec))
        found = search(settings, cfg, arguments)
        self.space, self.n_trials, self.search = found.space, found.n_trials, found
        self.n_jobs = max(1, int(settings.n_jobs))
        self.lock = StudyLock(self.storage_spec, self.name)
        with self.lock():  # two sweeps on a new database would both create Optuna's tables
            self.storage = open_storage(self.storage_spec)
        self.tracker = Tracker(cfg.tracking)
        self._stop = threading.Event()
        self._stop_reason: str | None = None
        self._settled_reason: str | None = None
        self._mine: set[int] = set()  # trial ids this process is running
        self._prune_above = PRUNE_ABOVE_BYTES  # kept bytes that make the next pruning
        self._mine_lock = threading.Lock()
        self.study = self._open_study()
        self._tell_study = optuna.load_study(study_name=self.name, storage=self.storage,
                                             sampler=optuna.samplers.RandomSampler())
        self.heartbeat = _trials.Heartbeat(self.storage, float(settings.heartbeat_interval))
        # The jobs' own pruner: the study's is bound to its sampler (Hyperband's brackets)
        self.here = SweptHere(self.storage_spec,
                              OmegaConf.merge(settings, {"storage": self.storage_spec,
                                                         "study_name": self.name}),
                              self.storage, make_pruner(settings.get("pruner")))

    # -- setting up -----------------------------------------------------------------------

    def _open_study(self) -> optuna.Study:
        directions = list(self.objectives.values())
        with self.lock():
            study = optuna.create_study(study_name=self.name, storage=self.storage,
                                        directions=directions, load_if_exists=True,
                                        pruner=make_pruner(self.s.get("pruner")))
            self._refuse_other_settings(study)
            self.study_id = study_id = self.storage.get_study_id_from_name(self.name)
            joins = int(self.storage.get_study_system_attrs(study_id).get("sweeper:joins", 0))
            self.storage.set_study_system_attr(study_id, "sweeper:joins", joins + 1)
            # Sweeps joining a study draw other random numbers than the first, or TPE's
            # random start-up trials would repeat the first sweep's.
            study.sampler = make_sampler(self.s.get("sampler"), seed_offset=1000 * joins,
                                         search=self.search)
            self.parent = self._parent(study)
        return study

    def _refuse_other_settings(self, study: optuna.Study) -> None:
        """Refuse a sweep whose settings differ from those the study's trials were started
        with (the task overrides, the sampler, the objectives), naming each; record them in a
        new study. A study from before the sampler was recorded resumes with any sampler, as
        it did. Call under the study lock."""
        got = [d.name.lower() for d in study.directions]
        names = list(study.metric_names) if study.metric_names is not None else self.names
        sampler = sampler_target(self.s.get("sampler"))
        overrides = study.user_attrs.get("task_overrides")
        recorded = study.user_attrs.get("sampler") if overrides is not None else None
        started, this = [], []
        if overrides is not None and sorted(overrides) != sorted(self.arguments):
            started.append(f"the overrides {overrides}")
            this.append(f"{self.arguments}")
        if recorded is not None and recorded != sampler:
            started.append(sampler_label(recorded))
            this.append(sampler_label(sampler))
        if got != list(self.objectives.values()) or names != self.names:
            started.append("the objectives " + ", ".join(
                f"{n}:{d}" for n, d in zip(names, got, strict=False)))
            this.append("the objectives " + ", ".join(f"{k}:{v}"
                                                      for k, v in self.objectives.items()))
        if started:
            choice = sampler_label(sampler).partition("hydra/sweeper/sampler=")[2]
            name = (f"{self.name}-{choice}" if choice and recorded not in (None, sampler)
                    else "...")
            raise UserError(
                f"Study {self.name!r} was started with {' and '.join(started)}; this sweep has "
                f"{' and '.join(this)}. Trials of different settings do not belong in one "
                "study: repeat the original settings to resume it, or name a new study with "
                f"hydra.sweeper.study_name={name}")
        if overrides is None:  # a new study (or one no sweep of this project started)
            study.set_user_attr("task_overrides", self.arguments)
            study.set_user_attr("sampler", sampler)
        if study.metric_names is None:
            study.set_metric_names(self.names)

    @property
    def storage_label(self) -> str:
        return storage_label(self.storage_spec)

    def _parent(self, study: optuna.Study) -> Run:
        """The study's MLflow parent run: created by the first sweep, reopened by the others."""
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if run_id is not None:
            return reopen(self.tracker, run_id)
        params = {f"search.{k}": v for k, v in self.space.describe().items()}
        sampler = self.s.get("sampler")
        pruner = self.s.get("pruner")
        params.update({
            "study_name": self.name,
            "storage": self.storage_label,
            "n_trials": self.n_trials,
            "objectives": ", ".join(f"{k}:{v}" for k, v in self.objectives.items()),
            "directions": ", ".join(self.objectives.values()),
            "sampler": describe(sampler),
            "pruner": describe(pruner),
            RULE_TOLERANCE: float(self.s.tolerance),
            RULE_CONFIDENCE: float(self.s.confidence),
        })
        for key in (sampler.get("repeat_keys") or ()) if sampler is not None else ():
            if key in self.space.sampled:  # the depth sampler's: one higher per repeat
                params[f"search.{key}"] = f"repeat key: {self.search.start.get(key)} + repeat"
        searched = set(self.space.sampled) | {k.lstrip("+~") for k in self.space.sampled}
        params.update({f"config.{k}": v for k, v in config_params(self.cfg).items()
                       if k not in searched})
        run = start_parent(self.tracker, self.name, self.storage_label, params, self.arguments,
                           OmegaConf.to_yaml(self.cfg, resolve=True))
        study.set_user_attr("mlflow_parent_run_id", run.run_id)
        study.set_user_attr("storage", self.storage_label)
        return run

    def _custom_space(self) -> Callable[[optuna.Trial], None] | None:
        """hydra-optuna-sweeper's ``custom_search_space`` hook, called as ``hook(cfg, trial)``;
        a failure in it is the user's, and stops the sweep with its message."""
        path = self.s.get("custom_search_space")
        if path is None:
            return None
        hook = get_method(str(path))

        def extend(trial: optuna.Trial) -> None:
            try:
                hook(self.cfg, trial)
            except Exception as e:  # noqa: BLE001 - the user's function
                raise UserError(f"hydra.sweeper.custom_search_space={path} failed on trial "
                                f"{trial.number}: {type(e).__name__}: {e}") from None

        return extend

    # -- running --------------------------------------------------------------------------

    def run(self, progress: str = "auto") -> StudyResult:
        """Work on the study until it holds n_trials trials (or fails too often)."""
        log.info("study %s: %d trials in total, %d at a time here; storage %s; MLflow parent "
                 "run %s", self.name, self.n_trials, self.n_jobs, self.storage_label,
                 self.parent.run_id)
        if hasattr(self.study.sampler, "budget"):
            log.info("%s: %s", type(self.study.sampler).__name__,
                     self.study.sampler.budget(self.n_trials))
        self.progress = Progress(self.study, self.names, self.n_trials, progress)
        swept_here(self.name, self.here)
        # What the process holds by now (torch, MLflow, SQLAlchemy, pandas, Hydra: some 670,000
        # objects for the default study) lives as long as the sweep: moved out of the garbage
        # collector's sight, a full collection scans only what the trials made since (one of
        # them took 0.3-0.4 s inside a trial, a few times a study; after this, about 0.05 s).
        # A trial makes many short-lived objects (configs, MLflow entities, module copies):
        # collecting the youngest every 10,000 allocations rather than 700 lets most of them
        # die before a collection looks at them.
        thresholds = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(10_000, *thresholds[1:])
        try:
            return self._run()
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            swept_here(self.name, None)

    def _run(self) -> StudyResult:
        try:
            with self.progress:
                while True:
                    self._work()
                    if self._stop.is_set() or not self._wait_for_others():
                        break
        except KeyboardInterrupt:
            self._abandon_mine(interruption())
            self.parent.tags({"error": "interrupted; run the same command to resume"})
            self.parent.end("KILLED")
            done = sum(t.state.is_finished() and _trials.counts_toward_total(t)
                       for t in self.study.get_trials(deepcopy=False))
            raise Interrupted(
                f"Interrupted: study {self.name!r} is resumable ({done} of {self.n_trials} "
                "trials finished, the interrupted ones will run again): run the same command "
                f"again to resume it. MLflow parent run {self.parent.run_id}.") from None
        finally:
            self.heartbeat.close()
        return self._finish()

    def _work(self) -> None:
        """n_jobs workers; each asks for the next trial as soon as its last one ends."""
        threads = [threading.Thread(target=self._worker, name=f"trial-worker-{i}", daemon=True)
                   for i in range(1, self.n_jobs)]
        for t in threads:
            t.start()
        self._worker()  # the first worker is this thread: Ctrl-C reaches its trial
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)

    def _worker(self) -> None:
        while not self._stop.is_set():
            with timing.measure() as wall:  # from asking for the trial to its result recorded
                nxt = self._next_trial()
                if nxt is None:
                    return
                ended = self._run_trial(*nxt)
            self._record_overhead(ended, wall.s)

    def _next_trial(self) -> tuple[FrozenTrial, list[str]] | None:
        """Ask for a trial and sample it, unless the study already holds n_trials trials."""
        with self.lock():
            self._reap_lost()
            if self._all_asked():
                return None
            if self._settled() is not None:
                return None
            trial = self.study.ask()
            try:
                overrides = self.space.suggest(trial, lambda key: OmegaConf.select(self.cfg, key),
                                               self._custom_space())
            except UserError as e:  # the custom_search_space hook failed: stop, recorded
                self.study.tell(trial, state=TrialState.FAIL)
                self._stop_reason = str(e)
                self._stop.set()
                return None
            self.storage.set_trial_system_attr(trial._trial_id, _trials.WORKER,
                                               _trials.worker_label())
            with self._mine_lock:
                self._mine.add(trial._trial_id)
            self.heartbeat.add(trial._trial_id)
            return self.storage.get_trial(trial._trial_id), overrides

    def _settled(self) -> str | None:
        """Why the sampler needs no more trials before n_trials (the depth sampler, once the
        answer is settled), or None."""
        done = getattr(self.study.sampler, "done", None)
        if done is None or self.study.get_trials(deepcopy=False,
                                                  states=(TrialState.WAITING,)):
            return None  # a queued retry runs first
        reason = done(self.study)
        if reason and self._settled_reason is None:
            self._settled_reason = reason
            log.info("study %s: %s; no more trials needed", self.name, reason)
        return reason

    def _run_trial(self, trial: FrozenTrial, overrides: list[str]) -> FrozenTrial:
        self.progress.started(trial.number, overrides, trial.user_attrs.get(PLAN))
        error: BaseException | None = None
        try:
            self.launch(trial.number, overrides)
        except Exception as e:  # noqa: BLE001 - recorded on the trial below
            error = e
        # (on KeyboardInterrupt the trial stays ours: run() marks it interrupted, to run again)
        self.heartbeat.remove(trial._trial_id)
        with self._mine_lock:
            self._mine.discard(trial._trial_id)
        now = self.storage.get_trial(trial._trial_id)
        if now.state == TrialState.RUNNING and _trials.job_killed(error):
            # Its process died without a word (scancel, killed for its memory, node gone):
            # lost, as when a sweep is killed, and retried once.
            reason = ("lost: its job was killed before it could report ("
                      + " ".join(str(error).splitlines()[:2]) + ")")
            with self.lock():
                self._lose(now, reason)
            now = self.storage.get_trial(trial._trial_id)
        elif now.state == TrialState.RUNNING:  # the job never got to tell: it failed outside it
            reason = (f"{type(error).__name__}: {error}" if error is not None
                      else "the job ended without reporting its trial")
            log.error("trial %d failed before it could report: %s", trial.number, reason)
            _trials.fail(self._tell_study, self.storage, trial._trial_id, trial.number, reason,
                         self.tracker, self.parent.run_id, overrides)
            now = self.storage.get_trial(trial._trial_id)
        self.progress.finished(now)
        self._check_failure_rate()
        store = self._kept
        if store is not None and store.nbytes() > self._prune_above and not self._all_asked():
            self._prune_kept()  # (after the last trial, the study's end prunes, once)
            self._prune_above = max(PRUNE_ABOVE_BYTES, 2 * store.nbytes())
        return now

    def _all_asked(self) -> bool:
        """Whether the study holds all its n_trials trials (no more will be asked for)."""
        return sum(_trials.counts_toward_total(t)
                   for t in self.study.get_trials(deepcopy=False)) >= self.n_trials

    @functools.cached_property
    def _kept(self) -> StateStore | None:
        """Where the study's trials keep their trained parts (:func:`kept_states`)."""
        return kept_states(self.cfg, self.s)

    def _prune_kept(self) -> None:
        """Delete the kept trained parts the study can no longer need: those of complete
        trials outside :meth:`_may_test` (bounds a long study's disk)."""
        store = self._kept
        if store is None:
            return
        try:
            frame = trial_frame(self.tracker, self.parent.run_id)
            done = set(frame[frame.state == State.COMPLETE].run_id)
            gone = store.prune(keep=set(store.run_ids()) - (done - self._may_test(frame)))
        except Exception as e:  # noqa: BLE001 - the study goes on; its end prunes again
            log.warning("kept trained parts not pruned: %s", e)
            return
        log.debug("pruned %d kept trained parts no report can need", len(gone))

    def _may_test(self, frame: pd.DataFrame) -> set[str]:
        """The runs whose trained parts the study keeps: those that may still get a test
        accuracy (:func:`sweeper.report.candidate_runs`, and the Pareto set: a trial once
        dominated stays so), so that a study resumed with more trials can still test what
        it then recommends."""
        pareto = {t.user_attrs.get("mlflow_run_id") for t in pareto_trials(self.study)}
        return set(candidate_runs(frame)) | (pareto - {None})

    def _record_overhead(self, trial: FrozenTrial, wall_s: float) -> None:
        """The trial's overhead (:func:`sweeper.timing.trial_overhead`), kept with the study
        so that whichever sweep finishes it sums every sweep's trials."""
        training_s = float((trial.system_attrs.get(_trials.PROGRESS) or {}).get("training_s", 0.0))
        self.storage.set_study_system_attr(self.study_id, f"{_trials.OVERHEAD}{trial.number}",
                                           timing.trial_overhead(wall_s, training_s))

    def _check_failure_rate(self) -> None:
        trials = [t for t in self.study.get_trials(deepcopy=False)
                  if t.state.is_finished() and _trials.counts_toward_total(t)]
        failed = [t for t in trials if t.state == TrialState.FAIL]
        rate = float(self.s.max_failure_rate)
        if len(trials) < int(self.s.failure_rate_min_trials) or len(failed) <= rate * len(trials):
            return
        last = failed[-1].user_attrs.get("error", "no reason recorded")
        self._stop_reason = (
            f"Study {self.name!r} stopped: {len(failed)} of {len(trials)} finished trials failed "
            f"({len(failed) / len(trials):.0%} > hydra.sweeper.max_failure_rate={rate:g}). "
            f"Last failure (trial {failed[-1].number}): {last}")
        self._stop.set()

    # -- trials whose process is gone ----------------------------------------------------

    def _reap_lost(self) -> list[FrozenTrial]:
        """FAIL running trials whose heartbeat stopped (call under the study lock)."""
        grace = float(self.s.grace_period)
        lost = []
        for t in _trials.stale_trials(self.study, grace):
            reason = (f"lost: no heartbeat for more than {grace:g} s (its process was killed "
                      f"or its machine went away; worker {t.system_attrs.get(_trials.WORKER)})")
            if t._trial_id in self._mine or not self._lose(t, reason):
                continue
            lost.append(t)
        return lost

    def _lose(self, t: FrozenTrial, reason: str, state: State = State.FAILED) -> bool:
        """Fail trial ``t``, whose process is gone, as lost (retried once), or that the user
        interrupted (``state`` KILLED: always run again, the promise of "resumable", whatever
        it was; a retry keeps the one retry left, if any, of the trial it resumes): its MLflow
        run ended in ``state`` first (made if it had none), so that the failed trial links it
        (user attr ``mlflow_run_id``; a finished trial takes no more attributes). False if
        someone else finished it first."""
        try:
            run_id = fail_trial_runs(self.tracker, self.parent.run_id, self.name, t.number,
                                     reason, state=state)
        except Exception as e:  # noqa: BLE001 - MLflow trouble must not block the study
            log.warning("could not mark the MLflow run of trial %d: %s", t.number, e)
            run_id = None
        if not _trials.mark_lost(self.storage, t, reason, run_id,
                                 interrupted=state == State.KILLED):
            return False
        log.warning("trial %d %s", t.number, reason)
        why = str(t.user_attrs.get(PLAN, "")).split(_AGAIN)[-1]  # a retry's: its first trial's
        plan = {PLAN: f"trial {t.number}{_AGAIN}{why}" if why else f"trial {t.number} again"}
        if state == State.KILLED:  # interrupted: the resumed study runs it
            kept = ({_trials.RETRY_OF: t.user_attrs[_trials.RETRY_OF]}
                    if _trials.RETRY_OF in t.user_attrs else {})
            self.study.enqueue_trial(t.params, user_attrs={_trials.RESUMES: t.number, **kept,
                                                           **plan})
            log.info("trial %d will run again with the same parameters when the study "
                     "resumes", t.number)
        elif self.s.retry_lost and _trials.RETRY_OF not in t.user_attrs:
            self.study.enqueue_trial(t.params, user_attrs={_trials.RETRY_OF: t.number, **plan})
            log.info("trial %d will be retried once with the same parameters", t.number)
        return True

    def _abandon_mine(self, reason: str) -> None:
        with self._mine_lock:
            mine = list(self._mine)
        for trial_id in mine:
            t = self.storage.get_trial(trial_id)
            if t.state == TrialState.RUNNING:
                self._lose(t, reason, State.KILLED)

    def _wait_for_others(self) -> bool:
        """Once this sweep has nothing left to ask: wait on other sweeps' running trials.

        Each either shows life (a heartbeat newer than the wait: its sweep finishes the
        study), ends, or goes stale and is failed (and maybe retried). Returns True when
        that freed room for more trials here.
        """
        since = time.time()
        interval = float(self.s.heartbeat_interval)
        while True:
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                return False
            if all(_trials.last_sign_of_life(t) > since for t in running):
                log.info("trials %s are running in other sweeps; they finish the study",
                         ", ".join(str(t.number) for t in running))
                return False
            with self.lock():
                if self._reap_lost():
                    return True
            time.sleep(min(interval, 1.0))

    # -- the end --------------------------------------------------------------------------

    def _finish(self) -> StudyResult:
        with self.lock():
            trials = self.study.get_trials(deepcopy=False)
            counted = sum(_trials.counts_toward_total(t) for t in trials)
            open_ = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
            complete = (counted >= self.n_trials or self._settled() is not None) and not open_
            test_acc: dict[int, float] = {}
            metrics: dict[str, float] = {}
            if complete:
                try:
                    test_acc, metrics = self._test_for_report()
                except KeyboardInterrupt:
                    self.parent.tags({"error": "interrupted while measuring the test accuracy "
                                               "of the report's trials; run the same command to "
                                               "finish the study"})
                    self.parent.end("KILLED")
                    raise Interrupted(
                        f"Interrupted while measuring the test accuracy of study {self.name!r}'s "
                        "report trials: run the same command again to finish it. MLflow parent "
                        f"run {self.parent.run_id}.") from None
            rows = summarize(self.parent, self.study, self.names, test_acc, metrics)
            if self._stop_reason is not None:
                self.parent.tags({"error": self._stop_reason[:5000]})
                self.parent.end("FAILED")
            elif complete:
                self.parent.end("FINISHED")
        result = StudyResult(self.study, self.parent.run_id, rows, complete)
        if self._stop_reason is not None:
            raise UserError(self._stop_reason + f"\nMLflow parent run {self.parent.run_id}.")
        log.info("study %s: %s. Pareto set (%s) on MLflow run %s:\n%s", self.name,
                 self.progress.line(trials), ", ".join(self.names), self.parent.run_id,
                 _table(rows, self.names))
        if complete:
            self._report()
        return result

    def _test_for_report(self) -> tuple[dict[int, float], dict[str, float]]:
        """Evaluate the test set of the trials :func:`sweeper.report.tested_runs` names (the
        recommendation, the reference and the Pareto set, under the study's rule) that have
        no test accuracy yet, from their kept trained parts; delete the kept parts that
        :meth:`_may_test` leaves out. Returns their test accuracies by trial number, and the
        parent run's overhead metrics (:func:`sweeper.timing.overhead_per_trial`). Call
        under the study lock."""
        study_id = self.study_id
        attrs = self.storage.get_study_system_attrs(study_id)
        store = self._kept
        accs: dict[int, float] = {}
        frame = trial_frame(self.tracker, self.parent.run_id)
        if store is not None and not frame.empty:
            needed = set(tested_runs(frame, float(self.s.tolerance), float(self.s.confidence),
                                     [t.number for t in pareto_trials(self.study)]))
            todo = frame[frame.run_id.isin(needed) & frame.test_acc.isna()]
            kept = set(store.run_ids())
            # Most units unfrozen first: each deeper cut's test entry derives from the last.
            todo = todo.sort_values(["unfrozen", "trial"], ascending=[False, True])
            with timing.measure() as spent:
                for row in todo.itertuples():
                    if row.run_id not in kept:
                        log.warning("trial %s: its trained part was not kept (%s), so its test "
                                    "accuracy cannot be measured", row.trial, store.folder)
                        continue
                    try:
                        accs[int(row.trial)] = evaluate_kept(row.run_id, store, self.tracker)
                    except Exception as e:  # noqa: BLE001 - the study's results stand without it
                        log.warning("trial %s: no test accuracy (%s: %s)", row.trial,
                                    type(e).__name__, e)
            if accs:
                log.info("study %s: test set of the %d trials the report shows evaluated in "
                         "%.1f s", self.name, len(accs), spent.s)
            tested_s = float(attrs.get(_TESTED_S, 0.0)) + spent.s
            self.storage.set_study_system_attr(study_id, _TESTED_S, tested_s)
            store.prune(keep=needed | self._may_test(frame))
        else:
            tested_s = float(attrs.get(_TESTED_S, 0.0))
        overheads = [float(v) for k, v in attrs.items() if k.startswith(_trials.OVERHEAD)]
        return accs, {"overhead_per_trial_s": timing.overhead_per_trial(overheads, tested_s),
                      "test_eval_time_s": tested_s}

    def _report(self) -> None:
        """The study's report (table, plots, recommendation), as ``python -m sweeper.report``
        would make it; a report that cannot be made does not fail the finished study."""
        try:
            report = make_report(self.cfg, parent_run=self.parent.run_id,
                                 optuna_study=self.study, tolerance=float(self.s.tolerance),
                                 confidence=float(self.s.confidence))
            show(report)
        except Exception as e:  # noqa: BLE001 - the study's results are already recorded
            log.warning("No report for study %s (%s); try: python -m sweeper.report "
                        "parent_run=%s", self.name, e, self.parent.run_id)
            return
        if self.s.get("register") and report.recommended:
            self._register(str(report.recommended["run_id"]))

    def _register(self, run_id: str) -> None:
        """``hydra.sweeper.register``: export the recommended trial's model and register it,
        as ``python -m sweeper.export`` would; a failure does not fail the finished study."""
        from sweeper.export import export_config, export_run

        cfg = export_config(self.cfg, registered_model=self.s.get("registered_model"))
        try:
            done = export_run(cfg, run_id, self.tracker, recommended_by=self.parent.run_id)
        except Exception as e:  # noqa: BLE001 - the study's results are already recorded
            log.warning("The recommended model was not exported (%s); try: python -m "
                        "sweeper.export parent_run=%s", e, self.parent.run_id)
            return
        log.info("recommended model: %s, registered as %s", done.pt2, done.model_uri)


def _table(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    if not rows:
        return "  (no complete trial)"
    lines = []
    for r in rows:
        params = {k: v for k, v in r.items()
                  if k not in {"trial", "state", "mlflow_run_id", *names}}
        lines.append(f"  trial {r['trial']}: " + "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in [*((n, r[n]) for n in names), *params.items()] if v is not None))
    return "\n".join(lines)


def optimize(cfg: DictConfig, sweep: DictConfig | Mapping[str, Any] | None = None, *,
             arguments: Sequence[str] = (), progress: str = "auto") -> StudyResult:
    """Run or resume, in this process, the study that ``sweep`` describes for config ``cfg``.

    ``cfg`` is the project's composed config; ``sweep`` the ``hydra.sweeper`` settings
    (default: ``cfg.hydra.sweeper`` when ``cfg`` was composed with
    ``return_hydra_config=True``); a mapping replaces those settings key by key. ``arguments`` are
    extra overrides in Hydra's grammar (sweeps join the search space). Trials run one at a
    time in this process, with the same Optuna storage, pruning, heartbeats and MLflow runs as
    ``python -m sweeper.run -m``; several processes calling it on the same storage and study
    share the study. Config-group choices (``backbone=...``) cannot be searched this way: use
    the command line for those.

    Returns the study, its MLflow parent run id and its Pareto set::

        from sweeper.config import compose
        from sweeper.study import optimize

        result = optimize(compose(overrides=["hydra.sweeper.n_trials=6"],
                                  return_hydra_config=True))
        print(result.pareto)
    """
    base = cfg.hydra.sweeper if "hydra" in cfg else default_settings()
    if isinstance(sweep, DictConfig) and "_target_" in sweep:
        base = sweep
    elif sweep is not None:  # top-level keys replace (objectives={val_acc: maximize} is one)
        base = OmegaConf.create(OmegaConf.to_container(base, resolve=False))
        for key, value in dict(sweep).items():
            base[key] = value
    task = task_config(cfg)
    check_config(task)  # before any trial, as the command line's callback does
    hydra = cfg.get("hydra")
    settings = check_settings(settings_in(task, base), task, arguments,
                              choices=hydra.runtime.choices if hydra is not None else None,
                              sweep_dir=OmegaConf.select(cfg, "hydra.sweep.dir", default=None),
                              storage=False)  # the runner opens the storage
    # Trials here share one process (and its feature cache and torch threads).
    one_at_a_time(settings, "optimize() runs its trials in this process; for parallel trials "
                            "run `python -m sweeper.run -m hydra/launcher=joblib "
                            f"hydra.sweeper.n_jobs={settings.n_jobs}`, or call optimize() from "
                            "several processes on the same storage")

    def launch(number: int, overrides: list[str]) -> None:
        result = run_job(apply_overrides(task, overrides), settings, number)
        if result.get("state") == State.FAILED:
            log.debug("trial %d failed: %s", number, result.get("error"))

    runner = StudyRunner(settings, task, launch, arguments)
    return runner.run(progress)

