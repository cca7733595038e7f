"""Checkpoints (`clinft_ray.modeling`): one cut short by a kill (its copy to storage stopped in the
middle, in whatever order the files went) is never loaded, since the manifest, written last, lists
every file with its size; one behind a URI is fetched once into the node's cache."""

from __future__ import annotations

import json

import pytest

from clinft_ray.modeling import MANIFEST, incomplete, read_manifest

from helpers import whole_checkpoint


def test_the_manifest_lists_every_file_and_a_checkpoint_cut_short_is_refused(tmp_path):
    ckpt = whole_checkpoint(tmp_path / "checkpoint_000000", 10)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["files"] == {"adapter_model.safetensors": 1000, "optimizer.pt": 2000,
                                 "sub/trainer_state.json": len(json.dumps({"global_step": 10}))}
    assert incomplete(str(ckpt)) is None and read_manifest(ckpt)["step"] == 10

    with (ckpt / "optimizer.pt").open("r+b") as f:  # a copy that stopped half way
        f.truncate(700)
    assert incomplete(str(ckpt)) == "optimizer.pt is missing or cut short"
    with pytest.raises(FileNotFoundError, match="not a complete clinft-ray checkpoint"):
        read_manifest(ckpt)
    (ckpt / "optimizer.pt").unlink()
    assert incomplete(str(ckpt)) == "optimizer.pt is missing or cut short"
    (ckpt / MANIFEST).unlink()  # the manifest had not arrived yet
    assert incomplete(str(ckpt)) == f"no {MANIFEST}"
    assert incomplete(ckpt.as_uri()) == f"no {MANIFEST}"  # the same check through a URI's filesystem


def test_checkpoint_behind_a_uri_is_fetched_once_into_the_node_cache(tmp_path, monkeypatch):
    from clinft_ray.modeling import MANIFEST, checkpoint_ref, local_checkpoint

    monkeypatch.setenv("CLINFT_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "storage" / "trial" / "checkpoint_000"
    ckpt.mkdir(parents=True)
    (ckpt / MANIFEST).write_text(json.dumps({"finetune": "full"}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    ref = checkpoint_ref(str(ckpt), "file:///somewhere")
    assert ref == f"file://{ckpt}"
    assert checkpoint_ref(str(ckpt), str(tmp_path)) == str(ckpt)  # a shared folder stays a path
    local = local_checkpoint(ref)
    assert local.parent == tmp_path / "cache" / "checkpoints"
    assert (local / "model.safetensors").read_bytes() == b"weights"
    assert not list(local.parent.glob("*.part-*"))
    (ckpt / "model.safetensors").write_bytes(b"changed")
    assert (local_checkpoint(ref) / "model.safetensors").read_bytes() == b"weights"  # cached, not fetched again


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_lora_updates_below_bf16_resolution_survive_in_the_model_that_is_scored(demo_dir, tmp_path):
    """On a bf16 model, an adapter whose delta is below half a bf16 step of the weights (what lr 1e-6
    and below train) changes the loaded model exactly as it changed the trained one; merging it, as
    clinft-ray did, rounds it away and scores the base. The same holds for a DPO adapter stacked on
    its frozen SFT adapter."""
    import torch
    from peft import PeftModel, get_peft_model

    from clinft_ray.config import ModelConfig
    from clinft_ray.modeling import (
        STACKED,
        load_base,
        load_model,
        load_stacked,
        peft_config,
        with_trainable_adapter,
        write_manifest,
    )

    cfg = ModelConfig(name_or_path=str(demo_dir / "model"), dtype="bfloat16", finetune="lora")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    torch.manual_seed(0)

    def nudge(model, adapter: str) -> None:  # lora_B as a few tiny optimizer steps leave it
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.data = torch.randn_like(param) * 1e-5

    sft = get_peft_model(load_base(cfg), peft_config(cfg))
    nudge(sft, "default")
    trained = _logits(sft, ids)
    sft.save_pretrained(tmp_path / "sft")
    write_manifest(tmp_path / "sft", cfg, parent=None, init_from=None, step=1)

    base = _logits(load_base(cfg), ids)
    assert not torch.equal(trained, base), "the adapter changes the model"
    assert torch.equal(_logits(load_model(cfg, tmp_path / "sft"), ids), trained), "scored = selected"
    merged = PeftModel.from_pretrained(load_base(cfg), tmp_path / "sft").merge_and_unload()
    key = "model.layers.0.self_attn.q_proj.weight"
    kept = (merged.state_dict()[key] != load_base(cfg).state_dict()[key]).float().mean()
    assert kept < 0.1, "merged into bf16, >90% of the weights' updates round away"
    assert not torch.equal(_logits(merged, ids), trained)

    dpo = with_trainable_adapter(load_stacked(cfg, tmp_path / "sft"), cfg)
    assert {n.split(".lora_")[1].split(".")[1] for n, p in dpo.named_parameters() if p.requires_grad} == {"default"}
    assert torch.equal(_logits(dpo, ids), trained), "a fresh DPO adapter starts from the SFT model"
    nudge(dpo, "default")
    tuned = _logits(dpo, ids)
    dpo.save_pretrained(tmp_path / "dpo")
    write_manifest(tmp_path / "dpo", cfg, parent=str(tmp_path / "sft"), init_from=str(tmp_path / "sft"), step=2)
    assert not list((tmp_path / "dpo").glob(f"{STACKED}_*")), "the SFT adapter is the parent's, not copied"
    assert not torch.equal(tuned, trained)
    assert torch.equal(_logits(load_model(cfg, tmp_path / "dpo"), ids), tuned)


@pytest.mark.parametrize(("native_bf16", "finetune", "expected"), [
    (True, "lora", "bfloat16"), (True, "full", "bfloat16"),
    (False, "lora", "float16"), (False, "full", "float32"),  # V100 / T4: bf16 only emulated
])
def test_auto_dtype_is_bf16_only_where_the_gpu_computes_in_it(monkeypatch, native_bf16, finetune, expected):
    import torch

    from clinft_ray.config import ModelConfig
    from clinft_ray.modeling import torch_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16
                        or including_emulation)
    assert torch_dtype(ModelConfig(name_or_path="m", finetune=finetune)) == getattr(torch, expected)
    assert torch_dtype(ModelConfig(name_or_path="m", dtype="float32")) == torch.float32
