"""Reference log-probs, computed once per SFT checkpoint and shared by every DPO trial of a sweep.

DPO's reference term, log pi_ref(answer | prompt) for the chosen and the rejected answer of each row,
depends on the reference model (the SFT checkpoint the sweep starts from), the rows, the tokenizer,
`max_length` and the precision, but not on the learning rate or beta. A sweep of 12 trials would
compute the same numbers 12 times, once per step of every trial. Here they are computed once, with the
prefix-shared forward of `PackedDPOTrainer`, before the trials start, and every trial reads them as
TRL's precomputed columns `ref_chosen_logps` / `ref_rejected_logps` (`precompute_ref_log_probs=True`),
so no trial runs or even loads a reference model.

The values are cached on disk under a folder the caller passes, one JSON file per key (checkpoint
path and fingerprint, data, tokenizer, `max_length`, precision), written to a temporary file and
renamed into place, so a killed writer never leaves a half cache behind and a resumed or repeated study
reads it instead of recomputing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clinft_ray.config import Study, TaskConfig
from clinft_ray.tracking import device_hours

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
ROW = "__clinft_row"  # where each prepared row came from, to align TRL's (filtered) rows with ours
# Per split, per column, one value per input row; None where TRL drops the row (its prompt fills max_length).
RefLogps = dict[str, dict[str, list[float | None]]]


def compute_reference_logps(model: Any, tokenizer: Any, splits: dict[str, list[dict[str, Any]]], args: Any) -> RefLogps:
    """Reference log-probs of preference rows (`splits` must hold "train"; any others are evaluated too).

    `model` is the reference itself (the SFT model, plain, not wrapped in PEFT); `args` is the trials'
    `DPOConfig` (`max_length`, precision, batch size), used with `precompute_ref_log_probs=True`. TRL
    tokenizes, filters and collates the rows exactly as in a trial; `PackedDPOTrainer` runs the prefix-
    shared forward.
    """
    from datasets import Dataset

    from clinft_ray.packed_dpo import PackedDPOTrainer

    args = copy.copy(args)
    args.precompute_ref_log_probs = True

    def dataset(rows: list[dict[str, Any]]) -> Any:
        return Dataset.from_list([{**row, ROW: i} for i, row in enumerate(rows)])

    others = {name: dataset(rows) for name, rows in splits.items() if name != "train"}
    trainer = PackedDPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset(splits["train"]),
                               eval_dataset=others or None, processing_class=tokenizer)
    prepared = {"train": trainer.train_dataset, **(trainer.eval_dataset or {})}
    out: RefLogps = {}
    for name, ds in prepared.items():
        values: dict[str, list[float | None]] = {col: [None] * len(splits[name]) for col in REF_COLUMNS}
        for col in REF_COLUMNS:
            for row, value in zip(ds[ROW], ds[col], strict=True):
                values[col][row] = float(value)
        out[name] = values
    return out


def with_reference(rows: list[dict[str, Any]], values: dict[str, list[float | None]]) -> list[dict[str, Any]]:
    """Preference rows with their reference columns, for a `PackedDPOTrainer` with
    `precompute_ref_log_probs=True`."""
    if any(len(values[col]) != len(rows) for col in REF_COLUMNS):
        raise ValueError(f"{len(rows)} rows but {len(values[REF_COLUMNS[0]])} cached reference values: the cache "
                         "was computed for other data; delete it to recompute")
    return [{**row, **{col: values[col][i] for col in REF_COLUMNS}} for i, row in enumerate(rows)]


def cached_reference_logps(cache_dir: str | Path, key: dict[str, Any], compute: Callable[[], RefLogps]) -> RefLogps:
    """The values stored under `key` in `cache_dir`, or `compute()`'s, stored there first.

    The file name is a hash of `key`, and the file repeats the key, which is checked on read. It is
    written whole to a temporary file in the same folder and renamed (atomic on POSIX), so readers see
    either no file or a complete one; two concurrent writers both compute and the last rename wins.
    """
    folder = Path(cache_dir)
    blob = json.dumps(key, sort_keys=True)
    path = folder / f"ref-logps-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(blob):
            return stored["logps"]
    values = compute()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"key": json.loads(blob), "logps": values}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return values


def checkpoint_fingerprint(ref: str | Path) -> str:
    """A hash of a checkpoint folder (a path or a `scheme://` URI): its manifest's content and every
    file's name, size and modification time. Reading the weights would cost as much as loading them;
    a checkpoint rewritten at the same path (a study re-run into the same storage) changes its times."""
    from pyarrow import fs

    if "://" in str(ref):
        filesystem, root = fs.FileSystem.from_uri(str(ref))
    else:
        filesystem, root = fs.LocalFileSystem(), str(Path(ref).resolve())
    digest = hashlib.sha256()
    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    for info in sorted((i for i in infos if i.type == fs.FileType.File), key=lambda i: i.path):
        digest.update(f"{info.path[len(root):]}\0{info.size}\0{info.mtime_ns}\n".encode())
        if info.base_name == "clinft_checkpoint.json":
            with filesystem.open_input_stream(info.path) as f:
                digest.update(f.read())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what turns rows into token ids: vocabulary and rules, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [vocab, str(tokenizer.chat_template), str(tokenizer.eos_token), str(tokenizer.pad_token),
             str(tokenizer.bos_token)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def data_fingerprint(splits: dict[str, list[dict[str, Any]]]) -> str:
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


def _reference_task(study: Study, task: TaskConfig, init_from: str) -> RefLogps:
    """Ray task: the reference values of a task's DPO rows under the SFT checkpoint."""
    from trl import DPOConfig

    from clinft_ray.data import dpo_rows
    from clinft_ray.modeling import has_chat_template, load_model, load_tokenizer, torch_dtype
    from clinft_ray.tasks import load_task_split
    from clinft_ray.trial import quiet_worker, trainer_kwargs

    cfg, space = study.config, study.dpo_space
    quiet_worker(cfg.resources.cpus_per_trial)
    tok = load_tokenizer(cfg.model)
    chat = has_chat_template(tok)
    splits = {s: dpo_rows(load_task_split(task, s), chat) for s in ("train", "eval")}
    with tempfile.TemporaryDirectory() as scratch:
        # A trial's arguments (its precision and autocast, so the values equal a live reference); the
        # learning rate is unused: nothing is trained here.
        args = DPOConfig(**trainer_kwargs(space, {"learning_rate": 0.0}, cfg.seed, torch_dtype(cfg.model), scratch),
                         max_length=cfg.model.max_length, precompute_ref_batch_size=space.batch_size)
        return compute_reference_logps(load_model(cfg.model, init_from), tok, splits, args)


def sweep_reference(study: Study, task: TaskConfig, init_from: str, worker: dict[str, float],
                    cache_dir: str | Path) -> tuple[RefLogps, dict[str, float]]:
    """The reference values for a DPO sweep from `init_from`: from the cache in `cache_dir`, or computed
    once by a Ray task holding one trial worker's resources (`worker`, a Ray resource request); and
    the device-hours that task cost (zero when the values came from the cache)."""
    from clinft_ray.data import dpo_rows
    from clinft_ray.modeling import has_chat_template, load_tokenizer
    from clinft_ray.sweep import device_task
    from clinft_ray.tasks import load_task_split

    cfg = study.config
    tok = load_tokenizer(cfg.model)
    chat = has_chat_template(tok)
    splits = {s: dpo_rows(load_task_split(task, s), chat) for s in ("train", "eval")}
    key = {
        "checkpoint": str(init_from),
        "checkpoint_fingerprint": checkpoint_fingerprint(init_from),
        "data": data_fingerprint(splits),
        "tokenizer": tokenizer_fingerprint(tok),
        "max_length": cfg.model.max_length,
        "dtype": cfg.model.dtype,
        "gpu": bool(worker.get("GPU", 0)),  # dtype "auto" and autocast differ between CPU and GPU
    }

    seconds = [0.0]

    def compute() -> RefLogps:
        values, seconds[0] = device_task(_reference_task, worker, study, task, init_from)
        return values

    values = cached_reference_logps(cache_dir, key, compute)
    return values, device_hours({"CPU": worker.get("CPU", 1), "GPU": worker.get("GPU", 0)}, seconds[0], cfg.cost)
