"""Search-space files (`tune_spaces/*.yaml`): commented data with a closed vocabulary, never code.

A space file names its stage, the swept hyperparameters and the fixed training schedule:

    stage: dpo
    learning_rate: {grid: [1.0e-5, 1.0e-6, 1.0e-7, 1.0e-8]}
    beta: {grid: [0.1, 0.3, 0.5]}
    max_steps: 1000
    eval_steps: 50

A swept value is a plain number (fixed), `{grid: [...]}` (every value, crossed with the other grids),
`{choice: [...]}` or `{loguniform: [low, high]}` (sampled `num_samples` times). `to_param_space()`
turns it into the `param_space` of a Ray Tune `Tuner`.

`scheduler: {asha: {grace_steps: 200, reduction_factor: 3}}` stops trials early with Ray Tune's
`ASHAScheduler` on the dev score they report (`to_scheduler()`); without it every trial trains to
`max_steps`. `search: {optuna: {seed: 0}}` lets Optuna's TPE pick each of the `num_samples` trials'
values from the ones before (`to_searcher()`), over `loguniform` / `choice` values only. `patience: N` stops a trial after N evals in a row without a better dev score (its own
plateau, `trial.DevReport`), independently of the other trials.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from clinft_ray.errors import ConfigError, format_errors


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _once(values: list[float], form: str) -> list[float]:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{form} lists {', '.join(f'{v:g}' for v in repeated)} more than once; list each value once "
                         "(a repeated value would run the same trial twice)")
    return values


class Grid(_Strict):
    grid: list[float] = Field(min_length=1)

    @field_validator("grid")
    @classmethod
    def _unique(cls, values: list[float]) -> list[float]:
        return _once(values, "grid")


class Choice(_Strict):
    choice: list[float] = Field(min_length=1)

    @field_validator("choice")
    @classmethod
    def _unique(cls, values: list[float]) -> list[float]:
        return _once(values, "choice")


class LogUniform(_Strict):
    loguniform: tuple[float, float]

    @model_validator(mode="after")
    def _order(self) -> LogUniform:
        lo, hi = self.loguniform
        if not 0 < lo < hi:
            raise ValueError(f"loguniform [{lo}, {hi}] needs 0 < low < high")
        return self


class Asha(_Strict):
    """Ray Tune's asynchronous successive halving on the dev score, with the optimizer step as time.

    Every trial trains `grace_steps`; then, at each rung (grace_steps x reduction_factor^k steps), a
    trial whose dev score is below the best 1/reduction_factor of the trials that reached that rung
    before it is stopped. A stopped trial keeps its checkpoints and can still be selected.
    """

    grace_steps: int = Field(gt=0, description="steps every trial trains before it may be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="keep the best 1/reduction_factor at each rung")


class Scheduler(_Strict):
    asha: Asha


class Optuna(_Strict):
    """Optuna's TPE sampler through Ray Tune's `OptunaSearch`: `num_samples` trials (the budget), each
    configuration suggested from the dev scores of the trials that finished before it. Seeded, and with
    `max_concurrent: 1` (the default) each suggestion sees every earlier trial, so a sweep on one GPU is
    reproducible; more in flight is faster on several GPUs, and what is suggested then depends on which
    trials finish first."""

    seed: int = 0
    max_concurrent: int = Field(1, gt=0, description="trials in flight; 1 makes the sweep reproducible")


class Search(_Strict):
    optuna: Optuna


SWEEPS = {"grid": Grid, "choice": Choice, "loguniform": LogUniform}


def _param_kind(value: Any) -> str:
    if isinstance(value, dict):
        return next(iter(value), "")
    return type(value).__name__.lower() if isinstance(value, BaseModel) else "fixed"


# Dispatch on the one key of a swept value, so a bad value gets one error from the form it meant.
Param = Annotated[
    Annotated[float, Tag("fixed")]
    | Annotated[Grid, Tag("grid")]
    | Annotated[Choice, Tag("choice")]
    | Annotated[LogUniform, Tag("loguniform")],
    Discriminator(_param_kind),
]


def param_values(p: Param | None) -> list[float]:
    """The numbers a swept value names: the fixed value, the grid or choices, or the loguniform bounds."""
    if p is None:
        return []
    if isinstance(p, Grid):
        return p.grid
    if isinstance(p, Choice):
        return p.choice
    if isinstance(p, LogUniform):
        return list(p.loguniform)
    return [p]


def _check_sweep(value: Any) -> Any:
    if isinstance(value, dict) and (len(value) != 1 or next(iter(value)) not in SWEEPS):
        keys = list(value)
        hint = difflib.get_close_matches(str(keys[0]), SWEEPS, n=1) if keys else []
        dym = f"did you mean {hint[0]!r}? " if hint else ""
        raise ValueError(f"{keys} is not a swept value; {dym}write a number, {{grid: [...]}}, {{choice: [...]}} "
                         "or {loguniform: [low, high]}")
    return value


class SearchSpace(_Strict):
    stage: Literal["sft", "dpo"]
    learning_rate: Param
    beta: Param | None = None
    num_samples: int = Field(1, gt=0, description="repeats of the grid, or samples of choice/loguniform")
    max_steps: int = Field(gt=0)
    eval_steps: int = Field(gt=0, description="steps between eval loss + dev score + checkpoint")
    batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    scheduler: Scheduler | None = Field(None, description="early stopping; default: every trial to max_steps")
    patience: int | None = Field(None, gt=0, description="stop a trial after this many evals without a better dev "
                                 "score (its plateau); default: every trial to max_steps")
    search: Search | None = Field(None, description="{optuna: {seed, max_concurrent}}: Optuna's TPE picks each "
                                  "trial's values; default: the grid, or random sampling of choice/loguniform")

    @field_validator("learning_rate", "beta", mode="before")
    @classmethod
    def _sweep_form(cls, value: Any) -> Any:
        return _check_sweep(value)

    @field_validator("learning_rate", "beta")
    @classmethod
    def _positive(cls, value: Param | None, info: Any) -> Param | None:
        """A learning rate or beta of 0 or below (or not finite) trains nothing, or backwards."""
        bad = [v for v in param_values(value) if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"{', '.join(f'{v:g}' for v in bad)} {'is' if len(bad) == 1 else 'are'} not positive; every "
                             f"{info.field_name} must be above 0, e.g. "
                             f"{'1.0e-5' if info.field_name == 'learning_rate' else '0.1'}")
        return value

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_form(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"a {type(value).__name__} is not a scheduler; write "
                             "{asha: {grace_steps: N, reduction_factor: 3}}, or leave scheduler out")
        return value

    @model_validator(mode="after")
    def _stage_fields(self) -> SearchSpace:
        if self.stage == "dpo" and self.beta is None:
            raise ValueError("a dpo space needs beta, e.g. beta: {grid: [0.1, 0.3, 0.5]}")
        if self.stage == "sft" and self.beta is not None:
            raise ValueError("beta is a DPO hyperparameter; remove it from the sft space")
        if self.eval_steps > self.max_steps:
            raise ValueError(f"eval_steps: {self.eval_steps} > max_steps {self.max_steps}: no checkpoint would be "
                             "scored; lower eval_steps")
        if self.scheduler is not None:
            self._check_asha(self.scheduler.asha)
        if self.search is not None:
            swept = self.swept()
            grids = [k for k, v in swept.items() if isinstance(v, Grid)]
            if grids:
                raise ValueError(f"search.optuna samples its values, so {', '.join(grids)} cannot be a grid; write "
                                 "{loguniform: [low, high]} or {choice: [...]}, and the budget as num_samples")
            if not any(isinstance(v, Choice | LogUniform) for v in swept.values()):
                raise ValueError("search.optuna has nothing to search: make learning_rate (or beta) "
                                 "{loguniform: [low, high]} or {choice: [...]}")
        return self

    def _check_asha(self, asha: Asha) -> None:
        if asha.grace_steps % self.eval_steps:
            raise ValueError(f"scheduler.asha.grace_steps: {asha.grace_steps} is not a multiple of eval_steps "
                             f"{self.eval_steps}: trials are compared where they report a dev score; use "
                             f"{max(self.eval_steps, asha.grace_steps // self.eval_steps * self.eval_steps)}")
        if asha.grace_steps >= self.max_steps:
            raise ValueError(f"scheduler.asha.grace_steps: {asha.grace_steps} is not shorter than the trial (max_steps "
                             f"{self.max_steps}), so no trial could stop early; lower grace_steps, or drop scheduler")

    def swept(self) -> dict[str, Param]:
        """The hyperparameters a trial receives in its Tune config."""
        out: dict[str, Param] = {"learning_rate": self.learning_rate}
        if self.beta is not None:
            out["beta"] = self.beta
        return out

    def to_param_space(self) -> dict[str, Any]:
        from ray import tune

        def one(p: Param) -> Any:
            if isinstance(p, Grid):
                return tune.grid_search(p.grid)
            if isinstance(p, Choice):
                return tune.choice(p.choice)
            if isinstance(p, LogUniform):
                return tune.loguniform(*p.loguniform)
            return p

        return {k: one(v) for k, v in self.swept().items()}

    def to_scheduler(self, metric: str) -> Any:
        """The Tune scheduler: ASHA on `dev/<metric>` (higher is better) with the optimizer step as
        time, or None (Tune's FIFO: every trial to max_steps)."""
        if self.scheduler is None:
            return None
        from ray.tune.schedulers import ASHAScheduler

        asha = self.scheduler.asha
        return ASHAScheduler(time_attr="step", metric=f"dev/{metric}", mode="max", max_t=self.max_steps,
                             grace_period=asha.grace_steps, reduction_factor=asha.reduction_factor)

    def to_searcher(self, metric: str) -> Any:
        """The Tune search algorithm: Optuna's seeded TPE on each trial's best dev score (`dev_best/<metric>`,
        what selection would take from it), at most `max_concurrent` trials in flight; or None (Tune's
        own: the grid, or random sampling)."""
        if self.search is None:
            return None
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        opt = self.search.optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = OptunaSearch(metric=f"dev_best/{metric}", mode="max",
                                sampler=optuna.samplers.TPESampler(seed=opt.seed))
        return ConcurrencyLimiter(searcher, max_concurrent=opt.max_concurrent)

    def num_trials(self) -> int:
        """Trials Tune will run: the product of the grids, times `num_samples`."""
        sizes = [len(p.grid) for p in self.swept().values() if isinstance(p, Grid)]
        return math.prod(sizes) * self.num_samples


def load_space(path: str | Path, stage: str) -> SearchSpace:
    """Load and validate a space file for `stage`; raises `ConfigError` listing every problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), ["file not found; point the stage's space: at a tune_spaces/*.yaml"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(str(p), ["not valid UTF-8 YAML; fix the syntax"]) from None
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as err:
        raise ConfigError(str(p), format_errors(err, SearchSpace)) from None
    if space.stage != stage:
        raise ConfigError(str(p), [f"stage: the file is a {space.stage} space, used as the {stage} space"])
    return space
