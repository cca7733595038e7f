"""The study, top to bottom: the paper's protocol for every task of a validated config.

    data -> base on test -> SFT sweep -> pick on dev -> DPO sweep from that pick -> pick on dev
         -> base / SFT / DPO on test -> paired statistics -> results.json, outcomes.jsonl, report.md
         -> the selected SFT and DPO models in the MLflow Model Registry

Everything heavy runs on Ray (trials via Tune, test scoring as Ray tasks with the same resources as a
trial), so the same code uses one local GPU, several, or a cluster. Every run and its device-hours
go to MLflow through `tracking.Tracker`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinft_ray.analysis import task_costs
from clinft_ray.config import SPLITS, Study, TaskConfig
from clinft_ray.console import level as console_level
from clinft_ray.data import Example, fingerprint, leakage_problems
from clinft_ray.dpo import run_dpo
from clinft_ray.errors import ConfigError, DataError, StudyError
from clinft_ray.evaluate import Scored
from clinft_ray.outputs import dotted_diff, publish, register_models, stored_config
from clinft_ray.preflight import (
    PreflightError,
    TrialResources,
    check_every_node_sees,
    check_judge,
    check_locations,
    check_storage,
    check_tracking,
    precision_warning,
    trial_resources,
    uses_judge,
)
from clinft_ray.progress import Progress, scored_from_json, scored_to_json, stage_from_json, stage_to_json
from clinft_ray.report import versions
from clinft_ray.sft import run_sft
from clinft_ray.sweep import AWS_KEYS, SYNC_PERIOD_S, StageResult, device_task, keys_withheld, object_store
from clinft_ray.tasks import load_task_split, one_prediction
from clinft_ray.tracking import (
    HOUR_UNITS,
    MODEL_VIEW,
    OUTBOX_FILE,
    DataSplit,
    Tracker,
    device_hours,
    redact_uri,
    study_tracking_uri,
)

log = logging.getLogger("clinft")


@dataclass(frozen=True)
class Evaluated:
    """A model scored on test (and dev for the base model), and what the scoring cost."""

    test: Scored
    dev: Scored | None
    hours: dict[str, float]


def run_study(study: Study) -> dict[str, Any]:
    """Run the whole study; returns the `results.json` content. Assumes a validated `Study`.

    A study that already finished in this output directory with the same config and data is not run
    again (a resubmitted job is a no-op): its `results.json` is returned as it is (`clinft report`
    redoes its statistics and costs with other `stats:` / `cost:` settings).
    """
    cfg = study.config
    data = check_data(study)  # every split checked before any compute
    check_locations(cfg)  # before anything is written: the output folder and storage are usable
    inputs = fingerprint_inputs(study)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    done = finished(study, key)
    uri = study_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
    held = cfg.output_dir / OUTBOX_FILE  # MLflow writes an earlier run could not send
    if done is not None:
        log.info("study %s already finished in %s with this config; nothing to train (results.json is kept)",
                 cfg.study, cfg.output_dir)
        if held.is_file():
            check_tracking(uri)
            Tracker(uri, cfg.mlflow.experiment or cfg.study).send_saved(held)
        return done
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    check_tracking(uri)  # seconds, before Ray starts: a dead server is reported before anything runs
    check_storage(cfg.storage_path)
    if uses_judge(cfg):
        check_judge(cfg.judge)
    progress = Progress(cfg.output_dir / "progress.json", cfg.study, key)
    resources = start_ray(study)
    check_every_node_sees(cfg)  # storage, splits and model on every node of a cluster, before any training
    tracker = Tracker(uri, cfg.mlflow.experiment or cfg.study, artifact_dir=cfg.output_dir / "mlartifacts")
    tracker.send_saved(held)
    if progress.resumed:
        log.info("study %s was interrupted in %s: going on where it stopped", cfg.study, cfg.output_dir)
    study_run = progress.run("study", tracker, lambda: tracker.start(cfg.study, tags={"clinft.kind": "study",
                                                                                        "clinft.level": "study"}))
    tracker.params(study_run, {"model": cfg.model.name_or_path, "finetune": cfg.model.finetune, "seed": cfg.seed,
                               "tasks": ",".join(t.name for t in cfg.tasks), "alpha": cfg.stats.alpha})
    if warning := precision_warning(study):
        log.warning(warning)
    if cfg.mlflow.log_examples:
        log.warning("mlflow.log_examples is %d: test answers of every stage go to MLflow and %s; they may "
                    "contain patient text", cfg.mlflow.log_examples, cfg.output_dir / "examples")
    status = "FAILED"
    try:
        results: dict[str, Any] = {
            "study": cfg.study,
            "fingerprint": key,
            "fingerprint_inputs": inputs,
            "config": stored_config(cfg),
            "versions": versions(),
            "tasks": {},
            "mlflow": {"tracking_uri": redact_uri(tracker.tracking_uri), "experiment_id": tracker.experiment_id,
                       "study_run_id": study_run},
        }
        outcomes: list[dict[str, Any]] = []
        curves: dict[str, dict[str, Any]] = {}
        for task in cfg.tasks:
            results["tasks"][task.name], sweeps = run_task(study, task, data[task.name], tracker, study_run,
                                                           resources, outcomes, progress)
            curves[task.name] = {s: (sw.curves, (sw.selected_trial, sw.selected.step)) for s, sw in sweeps.items()}
        # statistics -> figures, results.json, reports, and the MLflow runs (as `clinft report` redoes it)
        publish(cfg, results, outcomes, tracker, progress.data["runs"], curves)
        if cfg.mlflow.register_models:
            register_models(cfg, results, tracker, progress.data["runs"])
        status = "FINISHED"
        return results
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_open(status)  # the study run, and any task, stage or trial run a failure left open
        send_or_save(tracker, held, cfg.mlflow.outage_wait_s if status == "FINISHED" else 0.0)


def send_or_save(tracker: Tracker, held: Path, wait_s: float) -> None:
    """Writes held through an MLflow outage go in before the study returns. If the server is still
    down after `wait_s` they are saved for the next run, and a study that finished says so as its
    error (exit 1; its results are written): a stopped or failed one keeps its own error."""
    if tracker.flush(wait_s):
        return
    n = tracker.save_held(held)
    message = (f"MLflow at {redact_uri(tracker.tracking_uri)} did not answer for {wait_s:.0f} s: {n} writes for it "
               f"are saved in {held}; run the same command again once it answers to send them")
    if wait_s > 0:
        raise StudyError(f"the study finished (results in {held.parent}), but {message}")
    log.warning(message)


def run_task(study: Study, task: TaskConfig, data: dict[str, list[Example]], tracker: Tracker, study_run: str,
             resources: TrialResources, outcomes: list[dict[str, Any]],
             progress: Progress) -> tuple[dict[str, Any], dict[str, StageResult]]:
    """One task through the protocol; appends its test outcomes to `outcomes`, returns its results
    (without statistics: `outputs.publish` adds them) and its sweeps. Steps `progress` holds as done
    (the study is resuming) are taken from it, not run again."""
    task_run = progress.run(task.name, tracker,
                            lambda: tracker.start(task.name, parent=study_run,
                                                          tags={"clinft.task": task.name, "clinft.level": "task"}))
    splits = data_splits(task, data)
    for split in splits:  # fingerprints, not content: tells datasets apart without patient text
        tracker.params(task_run, {f"data.{split.context}.sha256": split.sha256, f"data.{split.context}.rows": split.rows})
    tracker.datasets(task_run, splits)

    stages: dict[str, dict[str, Any]] = {}
    scored: dict[str, Scored] = {}
    if (done := progress.get(f"{task.name}/base")) is None:
        log.info("[%s] base model on test", task.name)
        base_run = progress.run(f"{task.name}/base", tracker, lambda: tracker.start(
            "base", parent=task_run, tags={"clinft.task": task.name, "clinft.stage": "base", "clinft.level": "stage"}))
        tracker.datasets(base_run, [d for d in splits if d.context in ("dev", "test")])
        base = evaluate(study, task, None, resources, with_dev=True)
        log_examples(study, tracker, base_run, task.name, "base", base.test, data["test"])
        done = {"entry": log_base(tracker, base_run, base), "test": scored_to_json(base.test)}
        progress.put(f"{task.name}/base", done)
    stages["base"], scored["base"] = done["entry"], scored_from_json(done["test"])

    sweeps: dict[str, StageResult] = {}
    for stage, trials in (("sft", study.sft_space.num_trials()), ("dpo", study.dpo_space.num_trials())):
        if (done := progress.get(f"{task.name}/{stage}")) is None:
            log.info("[%s] %s sweep: %d trials%s", task.name, stage.upper(), trials,
                     " from the selected SFT checkpoint" if stage == "dpo" else "")
            sweep = (run_sft(study, task, tracker, task_run, resources, progress, splits) if stage == "sft" else
                     run_dpo(study, task, tracker, task_run, resources, sweeps["sft"], progress, splits))
            log.info("[%s] %s selected %s at step %d (dev %s %.3f)", task.name, stage.upper(), _hp(sweep.hparams),
                     sweep.selected.step, task.metric, sweep.selected.dev)
            scoring = evaluate(study, task, sweep.checkpoint, resources)
            test = scoring.test
            log_examples(study, tracker, sweep.run_id, task.name, stage, test, data["test"])
            done = {"entry": log_stage(tracker, sweep, test, task.metric, scoring.hours), "test": scored_to_json(test),
                    "sweep": stage_to_json(sweep)}
            progress.put(f"{task.name}/{stage}", done)
        stages[stage], scored[stage] = done["entry"], scored_from_json(done["test"])
        sweeps[stage] = stage_from_json(done["sweep"])

    for stage, sc in scored.items():
        warn_one_prediction(task.name, stage, sc)
        outcomes += [{"task": task.name, "stage": stage, "id": i, **{k: v[n] for k, v in sc.outcomes.items()}}
                     for n, i in enumerate(sc.ids)]
    result = {
        "kind": task.kind,
        "metric": task.metric,
        "n_test": len(scored["base"].ids),
        "data": {s.context: {"rows": s.rows, "sha256": s.sha256} for s in splits},
        "stages": stages,
        "outcomes": task.outcome_metrics,
        **task_costs(stages),
    }
    tracker.end(task_run)
    return result, sweeps


def warn_one_prediction(task: str, stage: str, scored: Scored) -> None:
    """One warning line when a stage predicts the same label (or option letter, or nothing) for every
    test example. It names the label, a word of the config, never an answer."""
    same = one_prediction(scored.outcomes)
    if same:
        said = ", ".join(f"{k} {'nothing' if v is None else repr(v)}" for k, v in same.items())
        log.warning("[%s] %s predicts the same for all %d test examples (%s): its metric says little; "
                    "look at its answers with mlflow.log_examples", task, stage, len(scored.ids), said)


def check_data(study: Study) -> dict[str, dict[str, list[Example]]]:
    """Every split of every task read and checked, plus the checks that need the tokenizer (not the
    model); raises one `DataError` listing all problems. Runs before any compute."""
    from clinft_ray.evaluate import data_problems
    from clinft_ray.modeling import load_tokenizer

    cfg = study.config
    data: dict[str, dict[str, list[Example]]] = {}
    problems: list[str] = []
    for task in cfg.tasks:
        data[task.name] = {}
        for s in SPLITS:
            try:
                data[task.name][s] = load_task_split(task, s)
            except DataError as err:
                problems += err.problems
    if problems:
        raise DataError(problems)
    try:
        tok = load_tokenizer(cfg.model)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(study.source), [f"model.name_or_path: cannot load the tokenizer of "
                                              f"{cfg.model.name_or_path!r} ({type(exc).__name__}); check the hub "
                                              "id or path, and that the hub or the folder is reachable"]) from None
    for task in cfg.tasks:
        d, p = data[task.name], task.splits
        for other in ("dev", "test"):
            problems += leakage_problems(d["train"], d[other], p.train, getattr(p, other))
        problems += data_problems(tok, task, {s: (getattr(p, s), d[s]) for s in SPLITS}, cfg.model.max_length,
                                  cfg.model.name_or_path)
    if problems:
        raise DataError(problems)
    return data


def data_splits(task: TaskConfig, data: dict[str, list[Example]]) -> list[DataSplit]:
    """A task's splits as MLflow records them (`tracking.DataSplit`): path, sha256, row count."""
    return [DataSplit(f"{task.name}/{s}", s, str(getattr(task.splits, s)), fingerprint(getattr(task.splits, s)),
                      len(data[s])) for s in SPLITS]


def fingerprint_inputs(study: Study) -> dict[str, Any]:
    """What decides a study's trained models and test scores: the config without where it runs
    (output and storage, Ray, MLflow, resources, the judge's address) and without what only the
    statistics and the report read (`stats`, `cost`: `clinft report` redoes those), the search
    spaces, and the data by content. Settings left at their defaults are left out, so a new option
    does not make a finished study look like another one."""
    cfg = study.config
    what = cfg.model_dump(mode="json", exclude_defaults=True,
                          exclude={"output_dir", "storage_path", "ray", "mlflow", "resources", "sft", "dpo",
                                   "stats", "cost"})
    for task, dumped in zip(cfg.tasks, what["tasks"], strict=True):
        dumped["splits"] = {s: fingerprint(getattr(task.splits, s)) for s in SPLITS}
    if what.get("judge"):
        what["judge"].pop("base_url", None)
    what["spaces"] = {stage: space.model_dump(mode="json", exclude_defaults=True)
                      for stage, space in (("sft", study.sft_space), ("dpo", study.dpo_space))}
    return what


def study_fingerprint(study: Study) -> str:
    """sha256 of `fingerprint_inputs`."""
    return hashlib.sha256(json.dumps(fingerprint_inputs(study), sort_keys=True).encode()).hexdigest()


def finished(study: Study, key: str) -> dict[str, Any] | None:
    """The results of this very study if it already finished in its output directory; a finished
    *different* study there is a `PreflightError` naming the keys that differ (its results would be
    overwritten)."""
    path = study.config.output_dir / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a results.json cut short: the study did not finish
    if results.get("study") == study.config.study and results.get("fingerprint") == key:
        return results
    if results.get("study") != study.config.study:
        differ = "study"
    elif "fingerprint_inputs" in results:
        differ = ", ".join(dotted_diff(results["fingerprint_inputs"], fingerprint_inputs(study))) or "(none found)"
    else:
        differ = "unknown (its results.json predates this check)"
    raise PreflightError(f"{study.config.output_dir} holds the finished study {results.get('study')!r} with another "
                         f"config or data (differing: {differ}); pass a new --out (or output_dir) to keep both")


def ray_environment() -> None:
    """The environment clinft-ray's driver gives Ray and Tune before it starts or joins Ray (what is
    already set wins). `clinft run` sets it; a benchmark or a test session that starts its own Ray
    calls it too."""
    # Tune warns when trials checkpoint often; scoring dev per eval interval is the design here.
    # It saves its experiment state every 2 s (its default adapts, 10 s at least), which goes to
    # storage with the trials' rows (`sweep.run_sweep`'s sync_period): a driver lost loses seconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(SYNC_PERIOD_S))
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A failed trial's traceback goes to its error.txt in the output directory, not to the console:
    # an exception message could quote a row. The study's own error says where to look.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Tune's own Ctrl-C handler stops the sweep and returns as if it had finished, and the study would
    # then select from half-run trials. `clinft` handles Ctrl-C and SIGTERM itself (`cli.stop_on_signals`):
    # Tune ends the sweep and saves its state, then the study marks its runs KILLED and stops. A
    # caller without that handler (a script, a notebook) gets KeyboardInterrupt out of fit() at once.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Ray Train's print patch copies prints that libraries capture on purpose (dill's code hashing
    # in `datasets`) into the worker logs, pages of bytecode per trial. On a cluster the job's
    # runtime environment (jobs/runtime_env.yaml) sets the same.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # A worker that holds no GPU sees none (Ray's documented switch; `trial.hide_unheld_gpus` does the
    # same inside workers that do not inherit this environment, on a cluster).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
    # Tune's CSV and JSON loggers are added by `sweep.run_sweep`; its TensorBoard logger is not wanted.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune warns when a callback takes over 0.5 s; a trial's MLflow writes on a busy sqlite store can,
    # and nothing is wrong (read when ray.tune is imported: `clinft` sets it first). MLflow's routine
    # INFO lines (creating its tables) are not clinft's news.
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "10")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Below --verbose, Tune's legacy reporter: silent at verbosity 0, where the new one still prints
    # each sweep's header table (`console.tune_verbosity`).
    if console_level() != "verbose":
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def start_ray(study: Study) -> TrialResources:
    """Join (or start) Ray and return the per-trial resource request, checked against the cluster."""
    import ray

    cfg = study.config
    ray_environment()
    # ray.init replaces the SIGTERM handler with its own (sys.exit); the caller's stays (`clinft run`
    # stops the study on SIGTERM as on Ctrl-C: `cli.stop_on_signals`).
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None  # None: not set from Python
    cluster = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))  # a Ray job's driver gets RAY_ADDRESS
    if cluster and (keys := [k for k in AWS_KEYS if k in os.environ]):
        log.warning("%s %s set in this job's environment: %s", ", ".join(keys), "is" if len(keys) == 1 else "are",
                    "Ray Tune copies them into every trial's runtime environment, which Ray writes in plain text "
                    "to runtime_env_agent.log on each node; give the nodes credentials instead (an instance or "
                    "pod role, a credentials file mounted on the nodes) and unset them"
                    if object_store(cfg.storage_path) else
                    "storage_path is not on S3, so clinft-ray does not pass them on to Ray")
    if ray.is_initialized():
        pass
    elif cluster:
        ray.init(address=cfg.ray.address, logging_level=logging.WARNING)
    else:  # a local Ray for this process: its dashboard (and job API) listen on loopback only
        with keys_withheld(cfg.storage_path):  # its processes inherit this environment
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     logging_level=logging.WARNING)
    if on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    return trial_resources(cfg.resources, ray.cluster_resources())


def _score_task(study: Study, task: TaskConfig, checkpoint: str | None, with_dev: bool) -> tuple[Scored, Scored | None]:
    from clinft_ray.evaluate import score_split
    from clinft_ray.judge import judge_for
    from clinft_ray.modeling import device, load_model, load_tokenizer
    from clinft_ray.trial import quiet_worker

    cfg = study.config
    quiet_worker(cfg.resources.cpus_per_trial)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, checkpoint).to(device())
    splits = ("test", "dev") if with_dev else ("test",)
    judge = judge_for(study)
    scored = [score_split(model, tok, task, load_task_split(task, s), cfg.model.max_length, judge) for s in splits]
    return scored[0], scored[1] if with_dev else None


def evaluate(study: Study, task: TaskConfig, checkpoint: str | None, resources: TrialResources,
             with_dev: bool = False) -> Evaluated:
    """Score the base model (`checkpoint=None`) or a checkpoint, as a Ray task with one trial
    worker's resources."""
    worker = resources.worker()
    (test, dev), seconds = device_task(_score_task, worker, study, task, checkpoint, with_dev)
    return Evaluated(test=test, dev=dev, hours=device_hours(worker, seconds, study.config.cost))


def log_examples(study: Study, tracker: Tracker, run: str, task: str, stage: str, scored: Scored,
                 examples: list[Example]) -> None:
    """Only with `mlflow.log_examples: N` (an explicit opt-in; off by default): the first N test
    answers of a stage, with their ids and gold answers, as an artifact. They may be patient text."""
    n = study.config.mlflow.log_examples
    if not n:
        return
    gold = {e.id: e.chosen for e in examples}
    path = study.config.output_dir / "examples" / f"{task}_{stage}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "gold": gold[i], "answer": a} for i, a in zip(scored.ids[:n], scored.answers[:n], strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tracker.artifact(run, path, "examples")


def hours_split(parts: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A stage's device-hours by what they paid for (`train`: the trials' training steps, eval loss and
    checkpoints; `dev_eval`: their dev scoring; `reference`: DPO's reference log-probs; `test_eval`:
    scoring the selected model on test, and dev for the base model), and their totals. Each part is
    counted once; parts with no hours are left out."""
    parts = {k: v for k, v in parts.items() if v}
    totals = {u: sum(p.get(u, 0.0) for p in parts.values()) for u in HOUR_UNITS}
    return {**totals, "hours_by": parts}


def _hour_metrics(entry: dict[str, Any]) -> dict[str, float]:
    return {**{u: entry[u] for u in HOUR_UNITS},
            **{f"{u}/{part}": v for part, h in entry["hours_by"].items() for u, v in h.items()}}


def log_base(tracker: Tracker, run: str, base: Evaluated) -> dict[str, Any]:
    hours = hours_split({"test_eval": base.hours})
    tracker.metrics(run, {**{f"test/{k}": v for k, v in base.test.metrics.items()},
                          **{f"dev/{k}": v for k, v in base.dev.metrics.items()}, **_hour_metrics(hours)})
    tracker.end(run)
    return {"dev": base.dev.metrics, "test": base.test.metrics, "trials": 0, **hours}


def log_stage(tracker: Tracker, stage: StageResult, test: Scored, metric: str,
              test_hours: dict[str, float]) -> dict[str, Any]:
    """Record a finished sweep on its stage run and return its `results.json` entry; its device-hours
    are the trials', the reference pass's (DPO) and the test scoring's."""
    hours = hours_split({**stage.hours_by, "test_eval": test_hours})
    selected = {**stage.hparams, "step": stage.selected.step, "trial": stage.selected_trial,
                "mlflow_run_id": stage.selected_run_id}
    tracker.params(stage.run_id, {f"selected.{k}": v for k, v in selected.items()})
    tracker.tag(stage.run_id, "clinft.selected_run_id", stage.selected_run_id)
    tracker.metrics(stage.run_id, {f"dev/{metric}": stage.selected.dev, **{f"test/{k}": v for k, v in test.metrics.items()},
                                   "trials": stage.trials, **_hour_metrics(hours)})
    tracker.end(stage.run_id)
    return {
        "selected": selected,
        "dev": {metric: stage.selected.dev},
        "test": test.metrics,
        "trials": stage.trials,
        **hours,
        "checkpoint": stage.checkpoint,
    }


def _hp(hparams: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in hparams.items())


def mlflow_ui_command(results: dict[str, Any], output_dir: Path) -> str:
    """How to see the study in the MLflow UI: the command for a local store, and the experiment's page."""
    uri, view = results["mlflow"]["tracking_uri"], MODEL_VIEW.format(id=results["mlflow"]["experiment_id"])
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{view}"
    return f"open {uri.rstrip('/')}/{view}"
