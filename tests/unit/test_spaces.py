"""Every shipped study config validates (keys, types, search spaces); only the data paths, which
point at the user's own files, are not required to exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clinft_ray.config import StudyConfig
from clinft_ray.spaces import load_space

from helpers import REPO

STUDIES = sorted((REPO / "examples").rglob("*.yaml")) + sorted((REPO / "clinft_ray" / "demo").glob("study*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_study_validates(path):
    text = path.read_text()
    assert text.startswith("#"), "a shipped config starts with a comment showing the command that uses it"
    cfg = StudyConfig.model_validate(yaml.safe_load(text))
    if path.parent.name == "demo":
        spaces = {s: REPO / "tune_spaces" / Path(getattr(cfg, s).space).name for s in ("sft", "dpo")}
    else:
        spaces = {s: (path.parent / getattr(cfg, s).space).resolve() for s in ("sft", "dpo")}
    assert load_space(spaces["sft"], "sft").num_trials() >= 1
    assert load_space(spaces["dpo"], "dpo").num_trials() >= 1
