"""A checkpoint cut short by a kill (its copy to storage stopped in the middle, in whatever order the
files went) is never loaded: the manifest, written last, lists every file with its size, and the
newest whole checkpoint beside a broken one is used instead."""

from __future__ import annotations

import json

import pytest
from ray.tune import Checkpoint

from clinft_ray.config import ModelConfig
from clinft_ray.modeling import MANIFEST, incomplete, read_manifest, write_manifest
from clinft_ray.trial import newest_whole


def _checkpoint(folder, step: int):
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (folder / "optimizer.pt").write_bytes(b"o" * 2000)
    (folder / "sub").mkdir()
    (folder / "sub" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    write_manifest(folder, ModelConfig(name_or_path="tiny"), parent=None, init_from=None, step=step)
    return folder


def test_the_manifest_lists_every_file_and_a_checkpoint_cut_short_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint_000000", 10)
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


def test_the_newest_whole_checkpoint_beside_a_broken_one_is_used(tmp_path):
    trial = tmp_path / "trial"
    _checkpoint(trial / "checkpoint_000000", 10)
    _checkpoint(trial / "checkpoint_000001", 20)
    latest = _checkpoint(trial / "checkpoint_000002", 30)
    (trial / "checkpoint_000003").mkdir()  # a later copy that never got its manifest
    assert newest_whole(Checkpoint.from_directory(str(latest))).path == str(latest)

    (latest / "adapter_model.safetensors").write_bytes(b"w" * 10)
    found = newest_whole(Checkpoint.from_directory(str(latest)))
    assert found.path == str(trial / "checkpoint_000001") and read_manifest(trial / "checkpoint_000001")["step"] == 20

    for name in ("checkpoint_000000", "checkpoint_000001"):
        (trial / name / MANIFEST).unlink()
    assert newest_whole(Checkpoint.from_directory(str(latest))) is None  # nothing whole: the trial starts over
    assert newest_whole(None) is None
