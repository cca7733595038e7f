"""The study's last step, and `clinft report` (driver only; no model, no Ray): statistics from the
per-example outcomes, then figures, `results.json`, `outcomes.jsonl`, `report.md` / `report.html`,
and their metrics and artifacts on the study's MLflow runs.

`publish` is what a study does once every task is scored; `rebuild` does the same for a finished
study from what it left in its output directory (`results.json` with its config, `outcomes.jsonl`,
`progress.json` with the MLflow run ids and the eval curves), with other `stats.*` or `cost.*`
settings. Nothing is trained or scored again; trial runs are left as they are.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clinft_ray.analysis import STAGES, study_statistics
from clinft_ray.config import TASK_KINDS, StudyConfig, apply_override, parse_overrides
from clinft_ray.errors import ConfigError, StudyError, format_errors
from clinft_ray.figures import cost_bars, outcome_bars, save, sweep_curves
from clinft_ray.report import write_outputs
from clinft_ray.tracking import Tracker, redact_uri

log = logging.getLogger("clinft")
# What `clinft report` may change: settings that do not change what was trained or scored.
REPORT_KEYS = ("stats.", "cost.", "mlflow.tracking_uri")
Curves = dict[str, dict[str, tuple[dict[str, Any], tuple[str, int]]]]  # task -> stage -> (trial curves, selected)


def stored_config(cfg: StudyConfig) -> dict[str, Any]:
    """The resolved config as `results.json` keeps it (a tracking URI's credentials removed)."""
    data = cfg.model_dump(mode="json")
    if data["mlflow"]["tracking_uri"]:
        data["mlflow"]["tracking_uri"] = redact_uri(data["mlflow"]["tracking_uri"])
    return data


def dotted_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two JSON-like configs (list items by index)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in dotted_diff(old.get(key), new.get(key), f"{prefix}{key}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new, strict=True)) for k in dotted_diff(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".") or "(top level)"]


def figures_for(cfg: StudyConfig, results: dict[str, Any], curves: Curves) -> dict[str, list[Path]]:
    """Each task's test bars and sweep curves, and the study's cost bars ("" key), each as PNG and SVG."""
    folder = cfg.output_dir / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    rule = (f"p < {results['threshold']:.2g}" if results["threshold"] is not None
            else f"Holm-adjusted p < {results['alpha']:g}")
    out: dict[str, list[Path]] = {}
    for name, task in results["tasks"].items():
        out[name] = save(outcome_bars(name, task, rule), folder / f"{name}_test.png")
        for stage, (points, selected) in curves.get(name, {}).items():
            out[name] += save(sweep_curves(name, stage, task["metric"], points, selected), folder / f"{name}_{stage}_sweep.png")
    out[""] = save(cost_bars(results), folder / "cost.png")
    return out


def publish(cfg: StudyConfig, results: dict[str, Any], rows: list[dict[str, Any]], tracker: Tracker,
            runs: dict[str, str], curves: Curves) -> list[Path]:
    """Statistics and costs at `cfg`'s settings, the files, and the study's MLflow runs updated.
    `runs`: MLflow run ids by progress name ("study", task, "task/stage"). Returns the files written."""
    study_statistics(cfg, results, rows)
    figures = figures_for(cfg, results, curves)
    for name, t in results["tasks"].items():
        tracker.metrics(runs[name], {k: v for k, v in t.items()
                                     if k.endswith(("_hours", "_ratio", "cost_usd")) and v is not None})
        for stage in STAGES:
            if f"{name}/{stage}" in runs:
                tracker.metrics(runs[f"{name}/{stage}"], {"cost_usd": t["stages"][stage]["cost_usd"]})
        for path in figures[name]:
            tracker.artifact(runs[name], path, "figures")
    study_run = runs["study"]
    tracker.metrics(study_run, {**results["totals"], "stats/alpha": results["alpha"],
                                "stats/comparisons_m": results["comparisons_m"]})
    tracker.tag(study_run, "clinft.correction", results["correction"])
    every = [p for name in results["tasks"] for p in figures[name]] + figures[""]
    files = write_outputs(cfg.output_dir, results, rows, every)
    for path in files:
        tracker.artifact(study_run, path)
    for path in every:
        tracker.artifact(study_run, path, "figures")
    return files


def register_models(cfg: StudyConfig, results: dict[str, Any], tracker: Tracker, runs: dict[str, str]) -> None:
    """Each task's selected SFT and DPO models in the MLflow Model Registry: a LoggedModel of the stage
    run (`export.registry_files`: the card, and the LoRA chain's combined adapter or a reference to
    the full weights) with its dev and test metrics, registered as `<study>-<task>`, alias the stage."""
    from clinft_ray.export import Selected, registry_files

    model = cfg.model
    for name, task in results["tasks"].items():
        for stage in ("sft", "dpo"):
            entry = task["stages"][stage]
            selected = Selected(cfg.study, name, stage, model, entry["checkpoint"], results)
            folder = cfg.output_dir / "registry" / f"{name}-{stage}"
            meta = registry_files(selected, folder)
            sel = entry["selected"]
            version = tracker.register_model(
                f"{cfg.study}-{name}", stage, runs[f"{name}/{stage}"], folder,
                params={k: v for k, v in sel.items() if k != "mlflow_run_id"} | {"base_model": model.name_or_path,
                                                                                 "finetune": model.finetune},
                metrics={**{f"dev/{k}": v for k, v in entry["dev"].items()},
                         **{f"test/{k}": v for k, v in entry["test"].items()}},
                tags={"clinft.study": cfg.study, "clinft.task": name, "clinft.stage": stage,
                      "clinft.fingerprint": results["fingerprint"], "clinft.format": meta["format"],
                      "clinft.checkpoint": entry["checkpoint"], "clinft.selected_run_id": sel["mlflow_run_id"]},
                description=f"{stage.upper()} model of {cfg.study} / {name}, selected on dev {task['metric']} "
                            f"{entry['dev'][task['metric']]:.3f}; its test metrics and MODEL_CARD.md are on the "
                            "source model")
            log.info("[%s] %s model registered: models:/%s-%s@%s (version %s)", name, stage.upper(), cfg.study,
                     name, stage, version)


def read_finished(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(results, outcome rows, progress) of a finished study; `StudyError` naming what is missing."""
    paths = {name: out_dir / name for name in ("results.json", "outcomes.jsonl", "progress.json")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise StudyError(f"{out_dir} holds no finished study ({', '.join(missing)} missing); pass the output "
                         "directory of a study that finished")
    try:
        results = json.loads(paths["results.json"].read_text())
        lines = paths["outcomes.jsonl"].read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        progress = json.loads(paths["progress.json"].read_text())
    except ValueError as exc:
        raise StudyError(f"{out_dir}: a results file is not valid JSON ({type(exc).__name__}); rerun the study") from None
    if "config" not in results:
        raise StudyError(f"{paths['results.json']} keeps no config (written by an older clinft-ray); rerun the study "
                         "with this version to rebuild its report")
    return results, rows, progress


def report_config(stored: dict[str, Any], overrides: list[str], source: str) -> StudyConfig:
    """The stored config with `--set` overrides, validated; refuses keys that would change training."""
    data = json.loads(json.dumps(stored))
    for key, value in parse_overrides(overrides):
        apply_override(data, key, value)
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, format_errors(err, StudyConfig, TASK_KINDS)) from None
    changed = [k for k in dotted_diff(stored, stored_config(cfg)) if not k.startswith(REPORT_KEYS)]
    if changed:
        raise ConfigError(source, [f"{', '.join(changed)}: would change what was trained or scored; clinft report "
                                   "only changes stats.*, cost.* and mlflow.tracking_uri (run the study with "
                                   "clinft run --out NEW_DIR for the rest)"])
    return cfg


def rebuild(out_dir: str | Path, overrides: list[str]) -> dict[str, Any]:
    """`clinft report`: the statistics, reports, figures and MLflow metrics of the finished study in
    `out_dir` at new `stats.*` / `cost.*` settings; returns the new `results.json` content."""
    out = Path(out_dir).resolve()
    results, rows, progress = read_finished(out)
    cfg = report_config(results["config"], overrides, str(out / "results.json"))
    cfg = cfg.model_copy(update={"output_dir": out})  # the folder may have moved since the study ran
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or results["mlflow"]["tracking_uri"]
    tracker = Tracker(uri, cfg.mlflow.experiment or cfg.study)
    curves: Curves = {}
    for key, done in progress["done"].items():
        task, _, stage = key.partition("/")
        if "sweep" in done:
            sw = done["sweep"]
            curves.setdefault(task, {})[stage] = (sw["curves"], (sw["selected_trial"], sw["selected"]["step"]))
    results["config"] = stored_config(cfg)
    publish(cfg, results, rows, tracker, progress["runs"], curves)
    if not tracker.flush(60):
        raise StudyError(f"MLflow at {redact_uri(uri)} did not answer for 60 s; the files in {out} are rebuilt, "
                         "run clinft report again once it answers to update the runs")
    return results
