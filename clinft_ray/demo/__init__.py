"""The built-in demo: a synthetic UTI-style task, a tiny local model, and the paper's grid shape.

`prepare_demo(out_dir)` writes everything a study needs into `out_dir` (data, model, search spaces,
study.yaml) without downloading anything; `clinft demo` then runs that study like any other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from clinft_ray.demo.make_uti_data import write_splits
from clinft_ray.demo.tiny import build_tiny_model

HERE = Path(__file__).resolve().parent


def tune_spaces_dir() -> Path:
    """The shipped `tune_spaces/` folder: inside the installed package, or at the repository root."""
    for candidate in (HERE.parent / "tune_spaces", HERE.parents[1] / "tune_spaces"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("tune_spaces/ is missing from this installation; reinstall clinft-ray")


def prepare_demo(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the demo study into `out_dir` and return the path of its study.yaml."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = write_splits(out / "data", seed=seed)
    corpus = []
    for path in paths.values():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            corpus += [row["prompt"], row["chosen"], row["rejected"]]
    if not (out / "model" / "config.json").exists():
        build_tiny_model(out / "model", corpus, seed=seed)
    (out / "tune_spaces").mkdir(exist_ok=True)
    for name in ("demo_sft.yaml", "demo_dpo.yaml"):
        shutil.copyfile(tune_spaces_dir() / name, out / "tune_spaces" / name)
    study = out / "study.yaml"
    shutil.copyfile(HERE / "study.yaml", study)
    return study
