"""Runs on the driver: what a person watching the console sees of a sweep.

By default (`clinft run`, `clinft demo`): one line per trial event, each with the sweep's progress in
trial-steps, the time it has taken and an estimate of what is left:

    clinft: [uti/sft 40/240 trial-steps, 0:31, ~2:35 left] lr1e-03 step 20: dev f1 0.667 (its best)

Ray Tune's own status tables only with `--verbose`; with `--quiet`, only warnings, errors and the
results. The level travels to the study (and to a Ray job's driver) as `CLINFT_CONSOLE`.

No row text is printed: trial names come from their hyperparameters, scores are numbers.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ray.tune import Callback

log = logging.getLogger("clinft")

LEVELS = ("quiet", "normal", "verbose")


def level() -> str:
    """The console level: `CLINFT_CONSOLE` (quiet | normal | verbose), normal by default."""
    value = os.environ.get("CLINFT_CONSOLE", "normal")
    return value if value in LEVELS else "normal"


def tune_verbosity() -> int:
    """Ray Tune's `RunConfig(verbose=...)`: its status tables only at the verbose level (below it the
    study has chosen Tune's legacy reporter, silent at 0: `study.ray_environment`)."""
    return 2 if level() == "verbose" else 0


def short_name(trial_name: str, prefix: str) -> str:
    """`uti-sft-lr1e-03-00001` -> `lr1e-03` (the hyperparameters; Tune's index dropped)."""
    name = trial_name.removeprefix(f"{prefix}-")
    head, _, index = name.rpartition("-")
    return head if index.isdigit() and head else name


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class TrialConsole(Callback):
    """A Ray Tune callback that says each trial's events in one line: started, evaluated (its dev
    score), stopped early and why, failed and retried, failed for good, finished (its best)."""

    def __init__(self, label: str, prefix: str, metric: str, max_steps: int, trials: int):
        self.label, self.prefix, self.metric = label, prefix, metric
        self.max_steps, self.total = max_steps, max_steps * trials
        self.steps: dict[str, int] = {}  # trial id -> steps done (max_steps once it has ended)
        self.best: dict[str, tuple[float, int]] = {}  # trial id -> (best dev, its step)
        self.start = time.monotonic()
        self.done_at_start: int | None = None  # steps already done when this process took over (a resume)

    def _say(self, trial: Any, text: str) -> None:
        done = sum(self.steps.values())
        if self.done_at_start is None:
            self.done_at_start = done
        elapsed = time.monotonic() - self.start
        new = done - self.done_at_start
        left = f", ~{clock(elapsed * (self.total - done) / new)} left" if 0 < new and done < self.total else ""
        log.info("[%s %d/%d trial-steps, %s%s] %s %s", self.label, done, self.total, clock(elapsed), left,
                 short_name(str(trial), self.prefix), text)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.steps.setdefault(trial.trial_id, 0)
        self._say(trial, "started" if not self.steps[trial.trial_id] else "goes on")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step = int(result.get("step", 0))
        self.steps[trial.trial_id] = max(self.steps.get(trial.trial_id, 0), step)
        dev = result.get(f"dev/{self.metric}")
        if result.get("stopped"):
            self._say(trial, f"stopped at step {step}: {result['stopped']}")
        elif isinstance(dev, int | float):
            best, _ = self.best.get(trial.trial_id, (float("-inf"), 0))
            if dev > best:
                self.best[trial.trial_id] = (float(dev), step)
            mark = " (its best)" if dev > best else ""
            self._say(trial, f"step {step}: dev {self.metric} {dev:.3f}{mark}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, f"failed ({_error_kind(trial)}): retried from its latest checkpoint")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.steps[trial.trial_id] = self.max_steps  # what it will not train is not left to do
        best = self.best.get(trial.trial_id)
        self._say(trial, f"finished, best dev {self.metric} {best[0]:.3f} at step {best[1]}" if best else "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.steps[trial.trial_id] = self.max_steps
        self._say(trial, f"failed ({_error_kind(trial)}) and is out of retries; the sweep goes on without it")


def _error_kind(trial: Any) -> str:
    from clinft_ray.tracking import error_kind, trial_error

    return error_kind(trial_error(trial))
