"""Loading an exported model as a server would, in a fresh Python process that never imports clinft_ray
(transformers alone, or PEFT on the base for an adapter), and the logits of the model clinft-ray scored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
folders, ids_path, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ids, logits = torch.load(ids_path), []
for folder, base in folders:
    if base:
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits.append(model.eval()(ids).logits)
torch.save(logits, out)
assert not [m for m in sys.modules if m.split(".")[0] == "clinft_ray"], "clinft_ray was imported"
"""


def fresh_logits(folders: list[tuple[Path, str | None]], ids: Any, tmp: Path) -> list[Any]:
    """The logits of `ids` from each exported folder (with its base model for an adapter, else None),
    computed in one new process (`-I`: no PYTHONPATH, no current folder on the path) that fails if
    anything imports clinft_ray."""
    import json

    import torch

    torch.save(ids, tmp / "ids.pt")
    pairs = json.dumps([[str(f), b] for f, b in folders])
    done = subprocess.run([sys.executable, "-I", "-c", LOADER, pairs, str(tmp / "ids.pt"), str(tmp / "logits.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp / "logits.pt")


def scored_logits(model_cfg: Any, checkpoint: str, ids: Any) -> Any:
    """The logits of `ids` from the model clinft-ray scored (`modeling.load_model`, in float32)."""
    import torch

    from clinft_ray.modeling import load_model

    with torch.no_grad():
        return load_model(model_cfg.model_copy(update={"dtype": "float32"}), checkpoint).eval()(ids).logits


def probe(tokenizer: Any, prompts: list[str]) -> Any:
    """Token ids of the first dev prompts as the chat template renders them, one batch of equal length."""
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    n = min(len(r) for r in rows)
    import torch

    return torch.tensor([r[:n] for r in rows])


# What a checkpoint holds beside the weights that an export must not carry.
TRAINING_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
                  "clinft_checkpoint.json", "clinft_dev.json")


def holds_no_training_state_or_rows(folder: Path, texts: list[str]) -> None:
    """No optimizer, scheduler, RNG, Trainer or clinft checkpoint file, and no row's text in any file."""
    names = {p.name for p in folder.rglob("*")}
    assert not names & set(TRAINING_FILES), names & set(TRAINING_FILES)
    assert not [p for p in names if p.startswith(("checkpoint", "rng_state"))]
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaked = [t for t in texts if t.encode() in data]
            assert not leaked, f"{path.name} holds row text"
