"""The LoRA path end to end on a small grid: SFT adapters, DPO adapters stacked on the selected SFT
adapter (reference = adapter disabled), and checkpoints that load back as one merged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from clinft_ray.config import load_study
from clinft_ray.modeling import load_model, read_manifest
from clinft_ray.study import run_study

pytestmark = pytest.mark.slow

SFT_SPACE = {"stage": "sft", "learning_rate": {"grid": [1.0e-2, 1.0e-4]}, "max_steps": 20, "eval_steps": 10,
             "batch_size": 8, "lr_scheduler": "constant"}
DPO_SPACE = {"stage": "dpo", "learning_rate": {"grid": [1.0e-3]}, "beta": {"grid": [0.1, 0.5]}, "max_steps": 10,
             "eval_steps": 5, "batch_size": 8, "lr_scheduler": "constant"}


@pytest.fixture(scope="module")
def lora_run(demo_dir, tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("lora")
    for sub in ("data", "model"):
        shutil.copytree(demo_dir / sub, out / sub)
    (out / "sft.yaml").write_text(yaml.safe_dump(SFT_SPACE))
    (out / "dpo.yaml").write_text(yaml.safe_dump(DPO_SPACE))
    shutil.copyfile(demo_dir / "study.yaml", out / "study.yaml")
    study = load_study(out / "study.yaml", ["study=uti-lora", "model.finetune=lora", "model.lora.r=8",
                                            "sft.space=sft.yaml", "dpo.space=dpo.yaml", "mlflow.log_examples=3"])
    return study, run_study(study)


def test_lora_checkpoints_chain_and_load(lora_run):
    import torch
    from transformers import AutoModelForCausalLM

    study, results = lora_run
    st = results["tasks"]["uti"]["stages"]
    assert st["sft"]["trials"] == 2 and st["dpo"]["trials"] == 2
    sft_ckpt, dpo_ckpt = st["sft"]["checkpoint"], st["dpo"]["checkpoint"]
    sft_m, dpo_m = read_manifest(Path(sft_ckpt)), read_manifest(Path(dpo_ckpt))
    assert sft_m["finetune"] == dpo_m["finetune"] == "lora"
    assert sft_m["parent"] is None and dpo_m["parent"] == sft_ckpt == dpo_m["init_from"]
    for ckpt in (sft_ckpt, dpo_ckpt):
        assert (Path(ckpt) / "adapter_model.safetensors").is_file()

    key = "model.layers.0.self_attn.q_proj.weight"
    base = AutoModelForCausalLM.from_pretrained(study.config.model.name_or_path).state_dict()[key]
    sft = load_model(study.config.model, sft_ckpt).state_dict()[key]
    dpo = load_model(study.config.model, dpo_ckpt).state_dict()[key]
    assert not torch.equal(base, sft) and not torch.equal(sft, dpo)


def test_lora_results_have_scores_and_costs(lora_run):
    _, results = lora_run
    t = results["tasks"]["uti"]
    for stage in ("base", "sft", "dpo"):
        assert 0.0 <= t["stages"][stage]["test"]["f1"] <= 1.0
        assert t["stages"][stage]["cpu_hours"] > 0
    assert [(c["a"], c["b"]) for c in t["comparisons"]] == [("base", "sft"), ("sft", "dpo"), ("base", "dpo")]
    assert t["dpo_sft_cost_ratio"] > 0


def test_example_answers_logged_only_when_opted_in(lora_run):
    study, results = lora_run
    for stage in ("base", "sft", "dpo"):
        rows = [json.loads(line) for line in (study.config.output_dir / "examples" / f"uti_{stage}.jsonl")
                .read_text().splitlines()]
        assert len(rows) == 3 and set(rows[0]) == {"id", "gold", "answer"}
        assert rows[0]["answer"] in ("UTI", "pyuria")
