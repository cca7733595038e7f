"""The built-in demo: synthetic tasks shaped like the paper's, a tiny local model, the paper's grid shape.

`prepare_demo(out_dir, tasks)` writes everything a study needs into `out_dir` (data, model, search
spaces, study.yaml) without downloading anything; `clinft demo` then runs that study like any other,
with a rule-based judge on 127.0.0.1 when the study has summaries (see `judge_server`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from clinft_ray.errors import ConfigError

HERE = Path(__file__).resolve().parent


def tune_spaces_dir() -> Path:
    """The shipped `tune_spaces/` folder: inside the installed package, or at the repository root."""
    for candidate in (HERE.parent / "tune_spaces", HERE.parents[1] / "tune_spaces"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("tune_spaces/ is missing from this installation; reinstall clinft-ray")


def prepare_demo(out_dir: str | Path, tasks: str = "classification", seed: int = 0) -> Path:
    """Write the demo study into `out_dir` and return the path of its study.yaml.

    `tasks`: "classification" (the default, fast demo), "all", or a comma-separated list of the kinds
    classification, triage, reasoning, summarization. Data for every kind is written, so the tiny
    model's tokenizer knows all of them and the folder serves any later choice.
    """
    # Imported here so that `python -m clinft_ray.demo.make_task_data` runs the module only once.
    from clinft_ray.demo.make_task_data import KINDS, write_task
    from clinft_ray.demo.tiny import build_tiny_model

    kinds = list(KINDS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ConfigError("--tasks", [f"{unknown or tasks!r}: not a task kind; use all, or some of {', '.join(KINDS)}"])
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = []
    for kind in KINDS:
        for path in write_task(kind, out / "data" / kind, seed=seed).values():
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                corpus += [row["prompt"], row["chosen"], row["rejected"]]
    if not (out / "model" / "config.json").exists():
        build_tiny_model(out / "model", corpus, seed=seed)
    (out / "tune_spaces").mkdir(exist_ok=True)
    for name in ("demo_sft.yaml", "demo_dpo.yaml"):
        shutil.copyfile(tune_spaces_dir() / name, out / "tune_spaces" / name)
    study = out / "study.yaml"
    if kinds == ["classification"]:
        shutil.copyfile(HERE / "study.yaml", study)
    elif sorted(kinds) == sorted(KINDS):
        shutil.copyfile(HERE / "study_all.yaml", study)
    else:  # a subset: the all-kinds study with only the chosen tasks
        data = yaml.safe_load((HERE / "study_all.yaml").read_text())
        data["tasks"] = [t for t in data["tasks"] if t["kind"] in kinds]
        if not any(t["kind"] == "summarization" for t in data["tasks"]):
            data.pop("judge")
        head = f"# The built-in demo with the task kinds {', '.join(kinds)}: clinft demo --tasks {tasks}\n"
        study.write_text(head + yaml.safe_dump(data, sort_keys=False))
    return study


def needs_judge(study_yaml: Path) -> bool:
    return "judge" in (yaml.safe_load(study_yaml.read_text()) or {})
