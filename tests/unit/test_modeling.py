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
