"""Loading models and tokenizers, and clinft-ray's checkpoint format.

A checkpoint is a folder with `clinft_checkpoint.json` beside the weights:

    {"finetune": "lora" | "full", "base_model": "<hub id or path>", "parent": "<checkpoint path> | null",
     "init_from": "<checkpoint the training started from> | null", "step": <optimizer step it was saved at>}

Checkpoints live in the study's storage (`storage_path`): a folder every node sees, or a URI such as
`s3://bucket/study/...`; `local_checkpoint` turns either into a local folder (URIs are fetched once
through Ray's `Checkpoint` into a node-local cache), so a DPO trial on any node finds its SFT model.

A full checkpoint holds the whole model. A LoRA checkpoint holds only its adapter, trained on top of
`parent` (the selected SFT checkpoint, for a DPO adapter) or of `base_model`; `load_model` rebuilds
the chain with every adapter stacked on the base, unmerged and active, which is the model that was
trained and selected. Merging would add each adapter's delta, cast to bf16, into bf16 weights: half a
bf16 step at |w| ~ 0.015 is ~3e-5, more than lr 1e-6 and below change a weight, so the merged model
that seeds DPO and is scored on test would not be the one selected on dev. Unmerged, the adapter's
delta is computed apart (in float32: PEFT keeps adapter weights in float32) and added to the layer's
output, where it survives. Merging is for export only, and in float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from clinft_ray.config import ModelConfig

MANIFEST = "clinft_checkpoint.json"


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(cfg: ModelConfig) -> Any:
    """The dtype to load weights in. 'auto': bf16 on a GPU that computes in it natively (compute
    capability 8.0 and up: A100, H100, L4, RTX 30xx+); on older GPUs (V100, T4), where PyTorch only
    emulates bf16 at a fraction of the speed, fp16 for LoRA (the adapter trains in fp32 under
    mixed precision) and fp32 for full fine-tuning (fp16 weights cannot take the optimizer's steps);
    fp32 on CPU."""
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if not torch.cuda.is_available():
        return torch.float32
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16 if cfg.finetune == "lora" else torch.float32


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=torch_dtype(cfg))


def load_model(cfg: ModelConfig, checkpoint: str | Path | None) -> Any:
    """The base model (`checkpoint=None`) or a clinft-ray checkpoint, as a transformers model: full
    weights as saved, or a LoRA chain's adapters stacked on the base, unmerged, active and frozen."""
    if checkpoint is None:
        return load_base(cfg)
    ckpt = local_checkpoint(checkpoint)
    if read_manifest(ckpt)["finetune"] == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype(cfg))
    return load_stacked(cfg, ckpt).get_base_model()


STACKED = "clinft_stacked"  # adapter-name prefix of the chain's adapters below the one a trial trains


def lora_chain(checkpoint: str | Path) -> list[Path]:
    """A LoRA checkpoint's adapters from the one next to the base up to `checkpoint`, as local folders."""
    chain = [local_checkpoint(checkpoint)]
    while parent := read_manifest(chain[0])["parent"]:
        chain.insert(0, local_checkpoint(parent))
    return chain


def load_stacked(cfg: ModelConfig, checkpoint: str | Path) -> Any:
    """A LoRA checkpoint's chain as a `PeftModel`: each adapter (`clinft_stacked_0`, ...) on the base,
    all active and frozen, none merged."""
    from peft import PeftModel

    chain = lora_chain(checkpoint)
    names = [f"{STACKED}_{k}" for k in range(len(chain))]
    model = PeftModel.from_pretrained(load_base(cfg), chain[0], adapter_name=names[0])
    for name, folder in zip(names[1:], chain[1:], strict=True):
        model.load_adapter(folder, adapter_name=name)
    model.base_model.set_adapter(names, inference_mode=True)
    return model


def with_trainable_adapter(model: Any, cfg: ModelConfig) -> Any:
    """A stacked `PeftModel` (`load_stacked`) with a fresh LoRA adapter ("default", what the trainer
    trains and saves at the checkpoint's top level) on top of the frozen ones, all active."""
    stacked = list(model.peft_config)
    model.add_adapter("default", peft_config(cfg))
    model.base_model.set_adapter([*stacked, "default"])
    for name, param in model.named_parameters():
        param.requires_grad_(".default." in name)
    return model


def peft_config(cfg: ModelConfig) -> Any:
    """The LoRA adapter config, or None for full fine-tuning."""
    if cfg.finetune != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def write_manifest(folder: str | Path, cfg: ModelConfig, *, parent: str | None, init_from: str | None,
                   step: int) -> Path:
    """Make a folder the trainer saved (PEFT adapter or full weights) a clinft-ray checkpoint.

    `parent` is what a LoRA adapter must be stacked on to load (the copies of the stacked adapters
    that PEFT saves beside it are dropped: the parent holds them); `init_from` records the checkpoint
    the training started from (None: the base model), whatever the fine-tuning mode. The manifest is
    written last and lists every file with its size: a folder without it, or whose files do not
    match it (a copy to storage cut off by a kill, in whatever order the files went), is incomplete
    and is never loaded (`incomplete`).
    """
    out = Path(folder)
    for copy in out.glob(f"{STACKED}_*"):  # PEFT saves every adapter; the stacked ones are the parents'
        shutil.rmtree(copy)
    files = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()}
    manifest = {"finetune": cfg.finetune, "base_model": cfg.name_or_path, "parent": parent, "init_from": init_from,
                "step": step, "files": files}
    part = out / f"{MANIFEST}.part"
    part.write_text(json.dumps(manifest, indent=1))
    part.rename(out / MANIFEST)
    return out


def incomplete(path: str, filesystem: Any = None) -> str | None:
    """Why the checkpoint folder at `path` cannot be loaded (no manifest, a file missing or cut
    short), or None when it is whole. `filesystem`: the pyarrow filesystem it is on (a Ray
    `Checkpoint`'s), else `path` is a local path or a URI."""
    import pyarrow.fs as pafs

    if filesystem is None:
        filesystem, path = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    path = path.rstrip("/")
    if filesystem.get_file_info(f"{path}/{MANIFEST}").type != pafs.FileType.File:
        return f"no {MANIFEST}"
    with filesystem.open_input_stream(f"{path}/{MANIFEST}") as f:
        files = json.loads(f.read()).get("files", {})
    infos = filesystem.get_file_info([f"{path}/{name}" for name in files])
    for (name, size), info in zip(files.items(), infos, strict=True):
        if info.type != pafs.FileType.File or info.size != size:
            return f"{name} is missing or cut short"
    return None


def read_manifest(ckpt: Path) -> dict[str, Any]:
    why = incomplete(str(ckpt))
    if why:
        raise FileNotFoundError(f"{ckpt} is not a complete clinft-ray checkpoint ({why}); select another or "
                                "run the stage again")
    return json.loads((ckpt / MANIFEST).read_text())


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def checkpoint_ref(path: str, storage: str) -> str:
    """Where a checkpoint in the study's storage lives, as a string any node can resolve: its path
    for a shared folder, `scheme://path` for storage given as a URI (Ray keeps paths without it)."""
    if "://" in storage and "://" not in path:
        return f"{storage.split('://', 1)[0]}://{path}"
    return path


def local_checkpoint(ref: str | Path) -> Path:
    """A checkpoint as a local folder: a path as it is; a URI fetched once into a node-local cache
    (`CLINFT_CACHE`, default ~/.cache/clinft), moved into place whole so no reader sees half of it."""
    if "://" not in str(ref):
        return Path(ref)
    from ray.tune import Checkpoint

    cache = Path(os.environ.get("CLINFT_CACHE", Path.home() / ".cache" / "clinft")) / "checkpoints"
    dest = cache / hashlib.sha256(str(ref).encode()).hexdigest()[:24]
    if (dest / MANIFEST).is_file():
        return dest
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    Checkpoint(str(ref)).to_directory(str(part))
    try:
        part.rename(dest)
    except OSError:  # another process on this node fetched it first
        shutil.rmtree(part, ignore_errors=True)
    return dest
