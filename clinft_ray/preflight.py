"""Driver: checks that run before any training: can this cluster, tracking server, judge and storage run the study?

Each failure is one `PreflightError` line that names the setting and the fix, raised within seconds: a trial that asks Ray for a GPU the cluster does not have would otherwise wait forever, a tracking
server that does not answer would otherwise stall the first MLflow call in long retries, and storage
that cannot be written would otherwise fail at the first checkpoint, after the first eval interval.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from clinft_ray.config import SPLITS, JudgeConfig, Resources, Study, StudyConfig
from clinft_ray.errors import PreflightError
from clinft_ray.spaces import param_values
from clinft_ray.tracking import redact_uri

TRACKING_TIMEOUT_S = 5.0
JUDGE_TIMEOUT_S = 30.0
DRIVER_CPUS = 0.01  # what the Tune trial that only drives a multi-worker TorchTrainer holds




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
    `gpus_per_trial: auto` is one GPU per worker where Ray sees a GPU, else 0."""
    gpus = resources.resolve_gpus(cluster.get("GPU", 0))
    workers = resources.workers(gpus)
    per_worker_gpus = gpus / workers if gpus > 1 else gpus
    have_gpus, have_cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    if gpus > have_gpus:
        auto = f" (auto: one per worker, workers_per_trial {workers})" if resources.gpus_per_trial == "auto" else ""
        raise PreflightError(f"resources.gpus_per_trial is {gpus:g}{auto} but Ray sees {have_gpus:g} GPUs; lower it "
                             "(0 runs on CPU) or add GPU nodes")
    if resources.strategy == "fsdp" and workers > 1 and not gpus:
        raise PreflightError("resources.strategy is fsdp but the trial has no GPU: transformers runs FSDP on GPUs "
                             "only (on CPU it would quietly train unsharded); use strategy: ddp on CPU")
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
    if "://" not in storage and (why := _writable_folder(Path(storage))):
        raise PreflightError(f"storage_path {storage} is not writable: it {why}; give a folder every node can write")
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


def check_every_node_sees(cfg: StudyConfig) -> None:
    """On a Ray cluster of several nodes, every node sees what a trial reads and writes by path: the
    storage folder (a marker the driver writes there must be visible, so a folder that exists on each
    node but is each node's own disk is caught), the split files and a local model folder. A trial on
    a node without them would fail, or, worse for storage, write checkpoints no other node can load.
    Checked with one zero-CPU Ray task per node, before any training; URIs (s3://, gs://) are the same
    from everywhere and are not checked. Runs on the driver, after Ray is joined."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    storage = cfg.storage_path.removeprefix("file://")
    paths = {f"tasks.{t.name}.splits.{split}": str(Path(getattr(t.splits, split)).resolve())
             for t in cfg.tasks for split in SPLITS}
    if Path(cfg.model.name_or_path).is_dir():
        paths["model.name_or_path"] = str(Path(cfg.model.name_or_path).resolve())
    marker = None
    if "://" not in storage:
        marker = Path(storage) / f".clinft-shared-check-{uuid.uuid4().hex}"
        marker.write_text(marker.name)
        paths["storage_path"] = str(marker)

    @ray.remote(num_cpus=0, max_retries=0)
    def missing(paths: dict[str, str]) -> list[str]:
        return [key for key, path in paths.items() if not os.path.exists(path)]

    try:
        found = ray.get([missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                         .remote(paths) for n in nodes], timeout=120)
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    problems = []
    for node, keys in zip(nodes, found, strict=True):
        where = f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"
        if "storage_path" in keys:
            problems.append(f"storage_path {storage} is not shared: {where} does not see a file the driver wrote "
                            "there, so its checkpoints would stay on its own disk; give a folder every node mounts "
                            "at the same path (NFS, a ReadWriteMany volume) or an object store URI (s3://...)")
        problems += [f"{key} {paths[key]} is not on {where}; put it where every node mounts the same path"
                     for key in keys if key != "storage_path"]
    if problems:
        raise PreflightError("\n".join(problems))


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def _writable_folder(path: Path) -> str | None:
    """Why `path` cannot become a folder this user writes (without creating anything), or None."""
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"is under {probe}, which is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return "is not writable by this user" if probe == path else f"cannot be created: {probe} is not writable"
    return None


def _data_folder_holding(place: Path, cfg: StudyConfig) -> tuple[str, Path] | None:
    """(the split's key, its folder) of the first split whose folder holds `place`: a saved dataset's
    folder, or a folder of split files. The output folder may be the folder of split files itself
    (outputs beside the data, as the demo's beside its data/), not a folder inside it."""
    for task in cfg.tasks:
        for split in ("train", "eval", "dev", "test"):
            data = Path(getattr(task.splits, split)).resolve()
            folder = data if data.is_dir() else data.parent
            if place == data or _inside(place, folder):
                return f"tasks.{task.name}.splits.{split}", folder
    return None


def check_locations(cfg: StudyConfig) -> None:
    """The output folder and a local storage path can be written, and sit outside the data: outputs
    (checkpoints trained on the data, logs) inside a data folder would mix with it, and a saved
    dataset folder's fingerprint would change under the study. Creates nothing. Every problem is one
    line of one `PreflightError`."""
    places = [("output_dir", Path(cfg.output_dir), "pass another --out (or output_dir)")]
    default_storage = str(Path(cfg.output_dir) / "ray")  # goes where output_dir goes, checked with it
    if cfg.storage_path and "://" not in cfg.storage_path and cfg.storage_path != default_storage:
        places.append(("storage_path", Path(cfg.storage_path), "set storage_path to another folder"))
    problems = []
    for key, place, fix in places:
        place = place.resolve()
        if why := _writable_folder(place):
            problems.append(f"{key} {place} {why}; {fix}")
            continue
        if found := _data_folder_holding(place, cfg):
            where, folder = found
            problems.append(f"{key} {place} is inside the data folder {folder} of {where}; keep outputs out of the "
                            f"data: {fix}")
    if problems:
        raise PreflightError("\n".join(problems))


def check_judge(judge: JudgeConfig) -> None:
    """The judge answers one chat completion (a fixed word, no patient text) with no retries."""
    from openai import OpenAI, OpenAIError

    key = os.environ.get(judge.api_key_env, "") if judge.api_key_env else ""
    client = OpenAI(base_url=judge.base_url, api_key=key or "not-needed", max_retries=0,
                    timeout=min(judge.timeout_s, JUDGE_TIMEOUT_S))
    try:
        client.chat.completions.create(model=judge.model, messages=[{"role": "user", "content": "Reply: ok"}],
                                       max_tokens=1, temperature=0)
    except OpenAIError as exc:
        raise PreflightError(f"judge.base_url {redact_uri(judge.base_url)} does not answer a chat completion for "
                             f"judge.model {judge.model!r} ({type(exc).__name__}); start the judge server or fix "
                             "judge.base_url, judge.model or judge.api_key_env") from None


def uses_judge(cfg: StudyConfig) -> bool:
    """Whether a task of the study is graded by the judge (summaries, or reasoning with grading: judge)."""
    return cfg.judge is not None and any(t.kind == "summarization" or getattr(t, "grading", "") == "judge"
                                         for t in cfg.tasks)


BF16_SMALLEST_UPDATE = 1e-5  # about half a bf16 step at |w| ~ 0.015, the scale of a 7-8B model's weights


def precision_warning(study: Study) -> str | None:
    """A warning when full fine-tuning would store weights in 16 bits and the spaces sweep learning
    rates whose updates are smaller than half a bf16/fp16 step of a typical weight: the optimizer's
    update rounds away and such a trial trains nothing (LoRA keeps its adapter in float32, unmerged:
    see `modeling`)."""
    cfg = study.config
    if cfg.model.finetune != "full" or cfg.model.dtype == "float32":
        return None
    small = sorted({lr for space in (study.sft_space, study.dpo_space) for lr in param_values(space.learning_rate)
                    if lr < BF16_SMALLEST_UPDATE}, reverse=True)
    if not small:
        return None
    where = "on a GPU (model.dtype auto)" if cfg.model.dtype == "auto" else f"(model.dtype {cfg.model.dtype})"
    return (f"model.finetune full keeps the weights in 16 bits {where}, where an update below ~1e-5 rounds away: "
            f"trials at learning rate {', '.join(f'{v:g}' for v in small)} would train nothing; use finetune: lora, "
            "or model.dtype: float32 (twice the memory)")
