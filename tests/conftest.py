"""Shared fixtures: one real local Ray per test session, and the demo study run once on it.

The demo study is the paper's protocol at full grid shape (4 SFT + 12 DPO trials) on the tiny local
model, with MLflow in sqlite; the end-to-end tests read its outputs and its MLflow runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import os

    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # as `clinft run` sets it (study.start_ray)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A prepared demo folder (data, tiny model, spaces, study.yaml); nothing run yet."""
    from clinft_ray.demo import prepare_demo

    out = tmp_path_factory.mktemp("demo")
    prepare_demo(out)
    return out


@pytest.fixture(scope="session")
def demo_run(demo_dir, ray_session):
    """The demo study, run once: (study, results)."""
    from clinft_ray.config import load_study
    from clinft_ray.study import run_study

    study = load_study(demo_dir / "study.yaml")
    return study, run_study(study)
