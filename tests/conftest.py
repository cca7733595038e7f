"""Shared fixtures: one real local Ray per test session, and the demo study run once on it.

The demo study is the paper's protocol at full grid shape (4 SFT + 12 DPO trials) on the tiny local
model, with MLflow in sqlite; the end-to-end tests read its outputs and its MLflow runs.
`MlflowServer` is a real `mlflow server` on 127.0.0.1 that a test can stop and start again.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and an artifact folder under `root`; `stop()`
    and `start()` again keep the port and the store, as a restarted server would."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not come up in 90 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


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


@pytest.fixture(scope="session")
def real_models(tmp_path_factory) -> dict[str, Path]:
    """The paper's two real tokenizers (Mistral-7B-Instruct-v0.2, Llama-3-8B-Instruct) with their chat
    templates, each on a tiny random model of its architecture and vocab, as folders clinft-ray loads
    (`tests/real_tokenizers.py`). Built once per session (about 10 s)."""
    from real_tokenizers import FAMILIES, build

    root = tmp_path_factory.mktemp("real")
    return {family: build(family, root / family) for family in FAMILIES}
