"""What a running study shows: a live rich table on a terminal, plain log lines otherwise.

Counts come from the storage (so trials of other sweeps on the same study show too); the
epoch of each running trial comes from the progress its job records every epoch.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.study._trials import INTERRUPTED, LOST, PROGRESS

log = logging.getLogger("sweeper.study")


def _fmt(values: Sequence[float] | None, names: Sequence[str]) -> str:
    if not values:
        return "-"
    return "  ".join(f"{n} {v:.4g}" for n, v in zip(names, values, strict=False))


class Progress:
    """Study-level progress: trials done / running / pruned / failed and the best so far."""

    def __init__(self, study: optuna.Study, names: Sequence[str], n_trials: int,
                 mode: str = "auto") -> None:
        self.study = study
        self.names = list(names)
        self.n_trials = n_trials
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._live = None
        self._cache: tuple[float, list[FrozenTrial]] = (0.0, [])
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        if self.mode == "rich":
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self, console=Console(stderr=True), refresh_per_second=1,
                              redirect_stdout=True, redirect_stderr=True, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def _trials(self, max_age: float = 2.0) -> list[FrozenTrial]:
        with self._lock:
            stamp, trials = self._cache
            if time.monotonic() - stamp > max_age:
                try:
                    trials = self.study.get_trials(deepcopy=False)
                except Exception:  # noqa: BLE001 - a display must never stop the study
                    pass
                self._cache = (time.monotonic(), trials)
            return trials

    def counts(self, trials: Sequence[FrozenTrial]) -> dict[str, int]:
        def n(state: TrialState) -> int:
            return sum(t.state == state for t in trials)
        gone = [t.system_attrs.get(LOST) for t in trials if t.state == TrialState.FAIL]
        interrupted = sum(g == INTERRUPTED for g in gone)
        lost = sum(bool(g) for g in gone) - interrupted
        return {"complete": n(TrialState.COMPLETE), "running": n(TrialState.RUNNING),
                "pruned": n(TrialState.PRUNED), "failed": len(gone) - lost - interrupted,
                "lost": lost, "interrupted": interrupted}

    def line(self, trials: Sequence[FrozenTrial]) -> str:
        c = self.counts(trials)
        done = c["complete"] + c["pruned"] + c["failed"]
        text = (f"{done}/{self.n_trials} done ({c['complete']} complete, {c['pruned']} pruned, "
                f"{c['failed']} failed), {c['running']} running")
        if c["interrupted"]:
            text += f", {c['interrupted']} interrupted (run again)"
        if c["lost"]:
            text += f", {c['lost']} lost (process gone)"
        return text + f" | best {self.best(trials)}"

    def best(self, trials: Sequence[FrozenTrial]) -> str:
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            return "-"
        first = self.study.directions[0]
        pick = max if first == optuna.study.StudyDirection.MAXIMIZE else min
        t = pick(complete, key=lambda t: t.values[0])
        return f"trial {t.number}: {_fmt(t.values, self.names)}"

    def __rich__(self) -> Any:
        from rich.table import Table

        trials = self._trials()
        table = Table(title=f"study {self.study.study_name}: {self.line(trials)}",
                      title_justify="left", expand=False)
        for col in ("trial", "state", "epoch", "val_acc", "params"):
            table.add_column(col)
        shown = [t for t in trials if t.state == TrialState.RUNNING][-8:]
        shown += [t for t in trials if t.state != TrialState.RUNNING][-5:]
        for t in shown:
            p = t.system_attrs.get(PROGRESS) or {}
            epoch = f"{p['epoch']}/{p['epochs']}" if p else ""
            acc = f"{p['val_acc']:.4f}" if p else ""
            if t.state.is_finished():
                acc = _fmt(t.values, self.names) if t.values else t.state.name.lower()
            table.add_row(str(t.number), t.state.name.lower(), epoch, acc,
                          " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in t.params.items()))
        return table

    def started(self, number: int, overrides: Sequence[str], why: str | None = None) -> None:
        """A trial began; ``why`` is the sampler's reason, when it gives one (the depth
        sampler's ``plan``)."""
        if self.mode == "log":
            log.info("trial %d started%s: %s", number, f" ({why})" if why else "",
                     " ".join(overrides))

    def finished(self, trial: FrozenTrial) -> None:
        if self.mode == "none":
            return
        trials = self._trials(max_age=0.0)
        if self.mode == "log":
            what = _fmt(trial.values, self.names) if trial.values else ""
            reason = trial.user_attrs.get("error") or trial.user_attrs.get("pruned") or ""
            log.info("trial %d %s %s%s | %s", trial.number, trial.state.name.lower(), what,
                     f" ({reason})" if reason and trial.state != TrialState.COMPLETE else "",
                     self.line(trials))
