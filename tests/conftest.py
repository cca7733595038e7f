"""Shared fixtures: one real local Ray per test session, the demo folder, the demo study run once on
it, one `mlflow server`, and the paper's real tokenizers on tiny models. Helpers that are not fixtures are in `helpers`.

`demo_run` costs a full study: the paper's protocol at full grid shape (4 SFT + 12 DPO trials) on
the tiny local model, with MLflow in sqlite, run once per session; the tests that read its outputs
and its MLflow runs say so by asking for it. `small_run` is a whole small study (2 SFT + 3 DPO trials
on trimmed splits), run once, that the interruption scenarios compare their reruns with.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import os

    import ray

    from clinft_ray.study import ray_environment

    ray_environment()  # as `clinft run` sets it
    # The trials' workers (which inherit this process's environment through Ray) keep the large blocks
    # of a training step in glibc's heap instead of handing them back to the OS and faulting them in
    # again at the next step: with a real tokenizer's vocabulary, a third of a CPU step. Test speed only.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**30))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**34))
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` on 127.0.0.1 for the session (sqlite store, local artifacts); tests that
    need an outage cut its link (`outage()`, `back()`) and leave it up."""
    from helpers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


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


@pytest.fixture(scope="session")
def small_dir(demo_dir, tmp_path_factory) -> Path:
    """A small copy of the demo study (`helpers.RESUMABLE_SFT` / `RESUMABLE_DPO` spaces, trimmed
    splits); `small_run` runs it in place, so copy it with `helpers.copy_demo` to run it elsewhere."""
    from helpers import RESUMABLE_DPO, RESUMABLE_SFT, small_study

    return small_study(demo_dir, tmp_path_factory.mktemp("small"), sft=RESUMABLE_SFT, dpo=RESUMABLE_DPO).parent


@pytest.fixture(scope="session")
def small_run(small_dir, ray_session):
    """The small study, run once, uninterrupted: (study, results)."""
    from clinft_ray.config import load_study
    from clinft_ray.study import run_study

    study = load_study(small_dir / "study.yaml")
    return study, run_study(study)


@pytest.fixture(scope="session")
def real_models(tmp_path_factory) -> dict[str, Path]:
    """The paper's two real tokenizers (Mistral-7B-Instruct-v0.2, Llama-3-8B-Instruct) with their chat
    templates, each on a tiny random model of its architecture and vocab, as folders clinft-ray loads
    (`tests/helpers/real_tokenizers.py`). Built once per session (about 10 s)."""
    from helpers.real_tokenizers import FAMILIES, build

    root = tmp_path_factory.mktemp("real")
    return {family: build(family, root / family) for family in FAMILIES}
