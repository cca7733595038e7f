"""plan.py: counts worked by hand, token counts as training tokenizes, the memory estimate against what
a real training step keeps on CPU, and `clinft plan` as a user runs it."""

from __future__ import annotations

import pytest

from clinft_ray.spaces import SearchSpace

from helpers import clinft_in_process


def _space(**kw) -> SearchSpace:
    base = {"stage": "dpo", "learning_rate": {"grid": [1e-5, 1e-6]}, "beta": {"grid": [0.1, 0.3, 0.5]},
            "max_steps": 100, "eval_steps": 10}
    return SearchSpace.model_validate({**base, **kw})


def test_trial_steps_every_trial_to_the_end_and_in_early_stoppings_best_case():
    from clinft_ray.plan import steps

    # 6 trials x 100 steps, 10 evals each; no early stopping: the best case is the same
    assert steps(_space()) == (600, 600, 60, 60)
    # patience 2: a trial stops at the earliest after 3 evals (30 steps): 6 x 30
    assert steps(_space(patience=2)) == (600, 180, 60, 18)
    # ASHA grace 20: every trial but one stops at step 20, one runs to 100: 5 x 20 + 100
    assert steps(_space(scheduler={"asha": {"grace_steps": 20}})) == (600, 200, 60, 20)
    # both: the one that goes on stops at its plateau (30); the others at grace (20): 5 x 20 + 30
    assert steps(_space(patience=2, scheduler={"asha": {"grace_steps": 20}})) == (600, 130, 60, 13)


def test_stage_tokens_worked_by_hand():
    from clinft_ray.plan import Tokens, stage_plan

    tokens = Tokens(rows={}, sft_row=50.0, dpo_row=70.0, longest_sft=90, longest_dpo=120, eval_sft=1000,
                    eval_dpo=1400, scoring={"dev": 3000, "test": 5000}, reference=20000)
    sft = stage_plan("uti", "sft", _space(stage="sft", beta=None, batch_size=8, gradient_accumulation_steps=2), tokens)
    assert (sft.trials, sft.tokens_per_step, sft.train_tokens) == (2, 8 * 2 * 50, 200 * 800)
    assert sft.forward_tokens == 20 * (1000 + 3000) + 5000  # 20 evals of eval loss + dev, then test once
    dpo = stage_plan("uti", "dpo", _space(batch_size=4, patience=1), tokens)
    assert dpo.tokens_per_step == 4 * 70 and dpo.steps_best == 6 * 20
    assert dpo.forward_tokens_best == 12 * (1400 + 3000) + 5000 + 20000  # and the reference pass once


def test_token_counts_are_the_ids_training_trains(demo_dir):
    from clinft_ray.config import load_study
    from clinft_ray.evaluate import row_tokens
    from clinft_ray.modeling import load_tokenizer
    from clinft_ray.plan import task_tokens
    from clinft_ray.tasks import load_task_split

    study = load_study(demo_dir / "study.yaml")
    task = study.config.tasks[0]
    tok = load_tokenizer(study.config.model)
    data = {s: load_task_split(task, s) for s in ("train", "eval", "dev", "test")}
    got = task_tokens(tok, task, data)
    e = data["train"][0]
    chosen, rejected = row_tokens(tok, e.prompt, e.chosen), row_tokens(tok, e.prompt, e.rejected)
    assert got.rows == {"train": 300, "eval": 200, "dev": 100, "test": 200}
    sft = [len(row_tokens(tok, x.prompt, x.chosen).prompt) + len(row_tokens(tok, x.prompt, x.chosen).answer)
           for x in data["train"]]
    assert got.sft_row == pytest.approx(sum(sft) / len(sft))
    assert len(chosen.prompt) + len(chosen.answer) + len(rejected.answer) <= got.longest_dpo
    loglik = sum(len(r.prompt) + len(r.answer) for x in data["test"]
                 for r in (row_tokens(tok, x.prompt, label) for label in task.labels))
    assert got.scoring["test"] == loglik


def _mid_model(folder, demo_dir):
    """A Llama-style model of another shape than the demo's (hidden 256, 4 layers, vocab 8,000), with
    the demo's tokenizer: where activations and logits weigh differently."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=8000, max_position_embeddings=512)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(demo_dir / "model").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model", ["demo", "mid"])
@pytest.mark.parametrize("sets", [["model.finetune=full"], ["model.finetune=lora"],
                                  ["model.finetune=full", "model.activation_checkpointing=true"]])
def test_the_memory_estimate_is_within_a_factor_of_two_of_what_a_real_step_keeps(demo_dir, tmp_path, model, sets):
    """`--calibrate` runs real AdamW steps on CPU and accounts what they hold: weights, gradients,
    optimizer state, and every tensor autograd saved for the backward (its storages, once each); the
    estimate for the same batch, without its transient parts (the layer that checkpointing recomputes
    in the backward, the LM head's tiles), is within a factor of two of it (measured: 0.7-1.0)."""
    from clinft_ray.config import load_study
    from clinft_ray.modeling import load_tokenizer
    from clinft_ray.plan import TRANSIENT, calibrate, make_plan, trial_memory
    from clinft_ray.tasks import load_task_split

    where = str(_mid_model(tmp_path / "mid", demo_dir)) if model == "mid" else str(demo_dir / "model")
    study = load_study(demo_dir / "study.yaml", [f"model.name_or_path={where}", *sets])
    task = study.config.tasks[0]
    data = {task.name: {s: load_task_split(task, s) for s in ("train", "eval", "dev", "test")}}
    tok = load_tokenizer(study.config.model)
    plan = make_plan(study, data, tok, on_gpu=False)
    cal = calibrate(study, data, tok, steps_=1)
    assert cal["device"] == "CPU" and cal["train_tps"] > 0 and cal["forward_tps"] > 0
    parts = trial_memory(study, plan.measured["shape"], plan.measured["adapter_params"], cal["batch"], cal["width"],
                         "sft", on_gpu=False)
    estimate = sum(v for k, v in parts.items() if k not in TRANSIENT)  # what a step keeps, as measured
    assert 0.5 <= estimate / cal["kept_bytes"] <= 2.0, (estimate, cal["kept_bytes"])


def test_clinft_plan_prints_counts_and_hours_and_refuses_a_trial_that_does_not_fit(demo_dir, capsys):
    config = str(demo_dir / "study.yaml")
    code, errors, text = clinft_in_process(capsys, "plan", config, "--tokens-per-second", "1000",
                                           "--set", "cost.gpu_hour_usd=2.5", "--gpu-memory-gb", "80")
    assert code == 0 and not errors, text
    # SFT: 4 trials x 60 steps, patience 1 at eval_steps 20: at best 4 x 40; DPO 12 x 20 (its best case too)
    sft = next(line for line in text.splitlines() if line.startswith("uti   SFT"))
    assert sft.split()[2:6] == ["4", "240", "160", "12"]
    dpo = next(line for line in text.splitlines() if line.startswith("uti   DPO"))
    assert dpo.split()[2:6] == ["12", "240", "240", "24"]
    assert "given: 1,000 training tokens/s, forward 3x that" in text and "of 80 GiB: fits" in text
    code, errors, text = clinft_in_process(capsys, "plan", config, "--gpu-memory-gb", "0.001")
    assert code == 2 and len(errors) == 1, text
    assert "one SFT trial needs about" in errors[0] and "batch_size 8 -> 4 with gradient_accumulation_steps x2" in errors[0]
    assert "DOES NOT FIT" in text  # the plan is printed before the error
    code, errors, _ = clinft_in_process(capsys, "plan", config, "--tokens-per-second", "0")
    assert code == 2 and errors == ["clinft: error: --tokens-per-second 0: give a positive number"]
