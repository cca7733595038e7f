"""export.py: adapters that add up into one, the checks an export makes, and the model card.

Whole studies exported and loaded in a fresh process: tests/scenarios/test_export.py (full weights)
and tests/scenarios/test_mlflow_server.py (LoRA, and the Model Registry)."""

from __future__ import annotations

import json
import re

import pytest

from clinft_ray.errors import PreflightError


def _adapter(folder, r: int, alpha: float, a, b, **extra) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    key = "base_model.model.model.layers.0.mlp.up_proj"
    save_file({f"{key}.lora_A.weight": torch.tensor(a, dtype=torch.float32),
               f"{key}.lora_B.weight": torch.tensor(b, dtype=torch.float32)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "lora_dropout": 0.05,
                                                            "target_modules": ["up_proj"], "peft_type": "LORA",
                                                            **extra}))


def test_two_adapters_add_up_to_one_of_their_summed_rank_worked_by_hand(tmp_path):
    """s1 B1 A1 + s2 B2 A2 with A1 = [1 2], B1 = [1 0]^T, s1 = 2/1 and A2 = [0 1], B2 = [0 3]^T,
    s2 = 1/1 is [[2 4], [0 3]]; the combined adapter is A = [[1 2], [0 1]], B = [[2 0], [0 3]] at
    rank 2 and scaling 2/2 = 1, and B A is that sum."""
    from clinft_ray.export import combine_adapters

    _adapter(tmp_path / "sft", 1, 2.0, [[1.0, 2.0]], [[1.0], [0.0]])
    _adapter(tmp_path / "dpo", 1, 1.0, [[0.0, 1.0]], [[0.0], [3.0]])
    config, tensors = combine_adapters([tmp_path / "sft", tmp_path / "dpo"])
    key = "base_model.model.model.layers.0.mlp.up_proj"
    assert tensors[f"{key}.lora_A.weight"].tolist() == [[1.0, 2.0], [0.0, 1.0]]
    assert tensors[f"{key}.lora_B.weight"].tolist() == [[2.0, 0.0], [0.0, 3.0]]
    assert (tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]).tolist() == [[2.0, 4.0], [0.0, 3.0]]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["inference_mode"]) == (2, 2, 0.0, True)


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"use_rslora": True}, {"rank_pattern": {"up_proj": 4}}])
def test_adapters_that_do_not_add_up_are_refused_naming_why(tmp_path, extra):
    from clinft_ray.export import combine_adapters

    _adapter(tmp_path / "a", 1, 1.0, [[1.0, 0.0]], [[1.0], [0.0]], **extra)
    with pytest.raises(PreflightError, match=f"uses {next(iter(extra))}.*--format merged"):
        combine_adapters([tmp_path / "a"])


def test_the_combined_adapter_on_the_base_is_the_stacked_chain(demo_dir, tmp_path):
    """A real SFT adapter and a DPO adapter trained on top of it (random, as training leaves them),
    combined and loaded with PEFT alone on the base: the logits of the chain clinft-ray scores."""
    import torch
    from peft import PeftModel, get_peft_model

    from clinft_ray.config import ModelConfig
    from clinft_ray.export import write_adapter
    from clinft_ray.modeling import (
        load_base,
        load_model,
        load_stacked,
        lora_chain,
        peft_config,
        with_trainable_adapter,
        write_manifest,
    )

    cfg = ModelConfig(name_or_path=str(demo_dir / "model"), dtype="float32", finetune="lora",
                      lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    torch.manual_seed(0)

    def nudge(model, adapter: str) -> None:
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.data = torch.randn_like(param) * 0.05

    sft = get_peft_model(load_base(cfg), peft_config(cfg))
    nudge(sft, "default")
    sft.save_pretrained(tmp_path / "sft")
    write_manifest(tmp_path / "sft", cfg, parent=None, init_from=None, step=1)
    dpo = with_trainable_adapter(load_stacked(cfg, tmp_path / "sft"), cfg)
    nudge(dpo, "default")
    dpo.save_pretrained(tmp_path / "dpo")
    write_manifest(tmp_path / "dpo", cfg, parent=str(tmp_path / "sft"), init_from=str(tmp_path / "sft"), step=2)

    (tmp_path / "one").mkdir()
    assert write_adapter(lora_chain(tmp_path / "dpo"), cfg.name_or_path, tmp_path / "one") == 8
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    with torch.no_grad():
        chain = load_model(cfg, tmp_path / "dpo").eval()(ids).logits
        one = PeftModel.from_pretrained(load_base(cfg), tmp_path / "one").eval()(ids).logits
        sft_only = load_model(cfg, tmp_path / "sft").eval()(ids).logits
    assert torch.allclose(one, chain, atol=1e-5, rtol=0)
    assert not torch.allclose(sft_only, chain, atol=1e-3), "the DPO adapter changes the model"
    saved = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == cfg.name_or_path and saved["r"] == 8


def _results() -> dict:
    stage = {"selected": {"learning_rate": 1e-3, "step": 10, "trial": "uti-sft-lr1e-03-00000", "mlflow_run_id": "r1"},
             "dev": {"f1": 0.8}, "test": {"f1": 0.75, "accuracy": 0.7}, "trials": 4, "gpu_hours": 1.5,
             "cpu_hours": 6.0, "cost_usd": 3.75, "checkpoint": "/s/ray/uti-sft/ckpt"}
    return {"study": "uti-llama3", "fingerprint": "ab" * 32, "versions": {"clinft-ray": "0.1.0", "trl": "1.16.0"},
            "config": {"seed": 0, "model": {"name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "finetune": "lora"}},
            "fingerprint_inputs": {"tasks": [{"name": "uti", "splits": {"train": "c" * 64}}]},
            "multiple_comparisons": {"footnote": "Bonferroni: alpha / m = 0.05 / 1"},
            "tasks": {"uti": {"kind": "classification", "metric": "f1", "n_test": 200,
                              "data": {"train": {"rows": 300, "sha256": "c" * 64}, "test": {"rows": 200, "sha256": "d" * 64}},
                              "stages": {"base": {**stage, "dev": {"f1": 0.1}, "test": {"f1": 0.2}, "trials": 0},
                                         "sft": stage, "dpo": {**stage, "test": {"f1": 0.9, "accuracy": 0.88}}},
                              "comparisons": [{"metric": "f1", "a": "sft", "b": "dpo", "test": "mcnemar_exact",
                                               "p_value": 0.004, "p_adjusted": 0.004, "significant": True,
                                               "bootstrap": {"f1": {"diff": -0.15, "ci": [-0.25, -0.05]}}}]}}}


def test_the_model_card_says_what_was_trained_on_what_and_how_it_scored():
    from clinft_ray.config import ModelConfig
    from clinft_ray.export import Selected, model_card

    results = _results()
    selected = Selected("uti-llama3", "uti", "dpo", ModelConfig.model_validate(results["config"]["model"]),
                        "/s/ray/uti-dpo/ckpt", results)
    card = model_card(selected, {"format": "adapter", "adapter_rank": 32, "exported": "2026-12-02 10:00 UTC",
                                 "check": {"probe_tokens": 48, "max_abs_diff": 2e-6, "max_abs_logit": 9.1}})
    for said in ("the DPO model", "meta-llama/Meta-Llama-3-8B-Instruct", "rank 32", "--max-lora-rank",
                 "| train | 300 | `" + "c" * 64, "| eval | not recorded |", "learning_rate 0.001, at optimizer step 10",
                 "sweep of 4 trials", "| DPO (this model) | 0.800 | f1 0.900, accuracy 0.880 |",
                 "| f1 | SFT vs DPO | -0.150 (-0.250, -0.050) | mcnemar_exact | 0.004 | 0.004 | yes |", "a minus b",
                 "Bonferroni: alpha / m", "| SFT | 1.5 | 6 | 3.75 |", "trained with: clinft-ray 0.1.0, trl 1.16.0",
                 "not been validated for clinical use", "protected health information", "subgroup",
                 "differ from those of the model clinft-ray scored by at most 2e-06"):
        assert said in card, said
    reference = model_card(selected, {"format": "checkpoint", "checkpoint": "/s/ray/uti-dpo/ckpt",
                                      "exported": "2026-12-02 10:00 UTC"})
    assert "models:/uti-llama3-uti@dpo" in reference and "by `clinft export`" in reference
    full = Selected("uti-llama3", "uti", "sft", ModelConfig.model_validate({**results["config"]["model"], "finetune": "full"}),
                    "/s/ray/uti-sft/ckpt", results)
    card = model_card(full, {"format": "merged", "dtype": "bfloat16", "exported": "2026-12-02 10:00 UTC",
                             "check": {"probe_tokens": 48, "max_abs_diff": 0.0, "max_abs_logit": 9.1}})
    assert "fine-tuning: full weights" in card and "LoRA" not in card and "at most 0 (identical)" in card


@pytest.mark.parametrize(("task", "stage", "said"), [
    (None, "sft", None), ("triage", "sft", "no task 'triage' (it has uti)"),
    ("uti", "base", "--stage 'base': export takes sft or dpo")])
def test_from_study_names_what_is_wrong(tmp_path, task, stage, said):
    from clinft_ray.export import from_study

    (tmp_path / "results.json").write_text(json.dumps(_results()))
    if said is None:
        assert from_study(tmp_path, task, stage).checkpoint == "/s/ray/uti-sft/ckpt"
        return
    with pytest.raises(PreflightError, match=re.escape(said)):
        from_study(tmp_path, task, stage)
    with pytest.raises(PreflightError, match="holds no finished study"):
        from_study(tmp_path / "nothing", task, stage)


def test_export_refuses_a_destination_that_holds_something(tmp_path):
    from clinft_ray.config import ModelConfig
    from clinft_ray.export import Selected, export

    selected = Selected("s", "uti", "sft", ModelConfig(name_or_path="x", finetune="full"), "/nowhere", _results())
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    for dest, said in (("file", "is a file"), ("full", "is not empty")):
        with pytest.raises(PreflightError, match=f"{said}; export into a new folder"):
            export(selected, tmp_path / dest)
    assert (tmp_path / "file").read_text() == "x" and [p.name for p in (tmp_path / "full").iterdir()] == ["a"]
