"""Checks that run before any training: can this cluster, tracking server and storage run the study?

Each failure is one `PreflightError` line that names the setting and the fix, raised within seconds:
a trial that asks Ray for a GPU the cluster does not have would otherwise wait forever, a tracking
server that does not answer would otherwise stall the first MLflow call in long retries, and storage
that cannot be written would otherwise fail at the first checkpoint, after the first eval interval.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from clinft_ray.config import Resources
from clinft_ray.tracking import redact_uri

TRACKING_TIMEOUT_S = 5.0
DRIVER_CPUS = 0.01  # what the Tune trial that only drives a multi-worker TorchTrainer holds


class PreflightError(RuntimeError):
    """The cluster, tracking server or storage cannot run this study as configured."""


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds: `workers` data-parallel workers of `gpus` GPUs and `cpus` CPUs each."""

    gpus: float
    cpus: float
    workers: int = 1

    def worker(self) -> dict[str, float]:
        """One worker's Ray resource request (also what a test-scoring task asks for)."""
        return {"CPU": self.cpus, "GPU": self.gpus} if self.gpus else {"CPU": self.cpus}

    def total(self) -> dict[str, float]:
        """Everything the trial holds: what its device-hours are billed on."""
        return {"CPU": self.cpus * self.workers, "GPU": self.gpus * self.workers}


def trial_resources(resources: Resources, cluster: dict[str, float]) -> TrialResources:
    """What one trial asks for, checked against what the cluster has in all.
    `gpus_per_trial: auto` is 1 where Ray sees a GPU, else 0."""
    gpus = resources.gpus_per_trial
    if gpus == "auto":
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    workers = resources.workers(gpus)
    per_worker_gpus = gpus / workers if gpus > 1 else gpus
    have_gpus, have_cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    if gpus > have_gpus:
        raise PreflightError(f"resources.gpus_per_trial is {gpus:g} but Ray sees {have_gpus:g} GPUs; lower it "
                             "(0 runs on CPU) or add GPU nodes")
    need = resources.cpus_per_trial * workers + (DRIVER_CPUS if workers > 1 else 0)
    if need > have_cpus:
        raise PreflightError(f"resources: a trial needs {need:g} CPUs ({workers} workers x {resources.cpus_per_trial:g}"
                             f"{' + its driver' if workers > 1 else ''}) but Ray sees {have_cpus:g}; lower "
                             "resources.cpus_per_trial or workers_per_trial")
    return TrialResources(gpus=float(per_worker_gpus), cpus=float(resources.cpus_per_trial), workers=workers)


def check_tracking(uri: str) -> None:
    """An http(s) tracking server must answer its /health endpoint within a few seconds."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=TRACKING_TIMEOUT_S)
    except requests.RequestException as exc:
        raise PreflightError(f"mlflow.tracking_uri {redact_uri(uri)} does not answer ({type(exc).__name__}); start "
                             "the MLflow server or fix the URI (or MLFLOW_TRACKING_URI)") from None
    if answer.status_code in (401, 403):
        raise PreflightError(f"mlflow.tracking_uri {redact_uri(uri)} refused the credentials (HTTP "
                             f"{answer.status_code}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if answer.status_code >= 400:
        raise PreflightError(f"mlflow.tracking_uri {redact_uri(uri)} answered HTTP {answer.status_code} at /health; "
                             "is it an MLflow server?")


def check_storage(storage: str) -> None:
    """The storage path (a folder or a URI of a filesystem Ray supports) takes a small write."""
    name = f".clinft-write-check-{uuid.uuid4().hex}"
    try:
        if "://" not in storage:
            folder = Path(storage)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"ok")
            (folder / name).unlink()
            return
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write(b"ok")
        fs.delete_file(f"{path}/{name}")
    except (OSError, ValueError, ImportError) as exc:
        raise PreflightError(f"storage_path {redact_uri(storage)} is not writable ({type(exc).__name__}); give a "
                             "folder every node can write, or a URI with credentials set (e.g. AWS_* for s3://)") \
            from None
