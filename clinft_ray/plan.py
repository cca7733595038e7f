"""Runs in the `clinft plan` process (no Ray, no training): what a study will cost, and whether one
trial fits its GPU, before anything runs.

- **Counts** (exact, from the config and the search spaces): trials per stage and task, trial-steps
  when every trial trains to `max_steps`, and in early stopping's best case (`patience`: every trial
  stops at its first plateau, after patience + 1 evals; ASHA: every trial but one stops at
  `grace_steps`), and the dev evaluations they make.
- **Tokens** (exact, from the data tokenized as training tokenizes it, `evaluate.row_tokens`): tokens
  per optimizer step (batch x accumulation x the mean row: prompt + answer for SFT, prompt + chosen +
  rejected for DPO, whose packed rows hold the prompt once), and the forward-only tokens of eval loss,
  dev scoring at every eval (every candidate answer for `loglik`, prompt + `max_new_tokens` for
  `generate`), DPO's reference pass and the test scoring of the three models.
- **Time and cost** from two throughputs, training and forward-only tokens per second of one trial:
  measured here by `--calibrate` (a few real optimizer steps of the study's model on this machine's
  device, on a batch of its own training rows), or given (`--tokens-per-second`; forward-only is then
  taken as 3x, the ratio of a forward to a forward + backward in FLOPs). Trial start-up is not in it.
- **Memory of one trial** (`trial_memory`): weights in the training dtype; for LoRA the adapter (and
  DPO's frozen SFT adapter) in float32 with its gradients and AdamW's two states, for full weights
  gradients and two AdamW states in the weights' dtype (FSDP divides these by the workers); the
  activations autograd keeps for the backward pass at the per-device batch and the longest row: per
  layer and token 12 x hidden + 5 x intermediate values (a Llama-style block: norms, q/k/v/o inputs,
  rotary q and k, the attention output, the gated MLP's four tensors), 6 x hidden + intermediate more
  for LoRA's dropout, or with activation checkpointing each layer's input, plus one layer's worth
  recomputed during the backward pass; and the LM head's tiles (TRL's fused head scores 4,096
  positions x 32,768 vocabulary rows at a time, never a batch's whole logits). Its kept parts (all
  but the two transient ones, `TRANSIENT`) are 0.7-1.0 times what a real training step keeps,
  measured on CPU from autograd's saved tensors at two model shapes, full and LoRA, with and without
  checkpointing (tests/unit/test_plan.py); the transient parts are not measured on CPU. On a GPU,
  `--calibrate` prints `torch.cuda.max_memory_allocated` beside the estimate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from clinft_ray.config import SPLITS, Study, TaskConfig
from clinft_ray.data import Example
from clinft_ray.spaces import SearchSpace

FORWARD_SPEEDUP = 3.0  # forward-only tokens per second over training ones, when not measured (2N vs 6N FLOPs)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Parts of `trial_memory` that exist only while a step computes them (not kept for the backward pass).
TRANSIENT = ("recomputed layer", "LM head tiles")


@dataclass(frozen=True)
class Tokens:
    """A task's data in tokens, as training and scoring read it."""

    rows: dict[str, int]
    sft_row: float  # mean prompt + answer tokens of a train row
    dpo_row: float  # mean prompt + chosen + rejected tokens of a train row (the packed pair)
    longest_sft: int
    longest_dpo: int
    eval_sft: int  # all eval rows, SFT (eval loss)
    eval_dpo: int
    scoring: dict[str, int]  # dev / test: forward tokens of scoring the split once
    reference: int  # DPO's reference pass: the packed pairs of train and eval, once


@dataclass(frozen=True)
class StagePlan:
    task: str
    stage: str
    trials: int
    steps_max: int
    steps_best: int
    evals_max: int
    evals_best: int
    tokens_per_step: float
    train_tokens: float
    forward_tokens: float  # at every trial to max_steps: eval loss, dev scoring, reference, test scoring
    forward_tokens_best: float


@dataclass
class Plan:
    stages: list[StagePlan]
    tokens: dict[str, Tokens]
    memory: dict[str, dict[str, float]]  # stage -> bytes by part
    gpus_per_trial: float
    train_tps: float | None = None
    forward_tps: float | None = None
    measured: dict[str, Any] = field(default_factory=dict)


def steps(space: SearchSpace) -> tuple[int, int, int, int]:
    """(trial-steps when every trial runs to max_steps, in early stopping's best case, evals likewise)."""
    n = space.num_trials()
    every = space.max_steps
    best = every
    if space.patience is not None:
        best = min(best, (space.patience + 1) * space.eval_steps)
    if space.scheduler is not None:
        best_all = (n - 1) * min(best, space.scheduler.asha.grace_steps) + best
    else:
        best_all = n * best
    return n * every, best_all, n * (every // space.eval_steps), best_all // space.eval_steps


def task_tokens(tokenizer: Any, task: TaskConfig, data: dict[str, list[Example]]) -> Tokens:
    """The token counts of a task's splits (`evaluate.row_tokens`: exactly the ids TRL trains)."""
    from clinft_ray.evaluate import loglik_candidates, prompt_ids, row_tokens

    def pair(e: Example) -> tuple[int, int]:
        chosen, rejected = row_tokens(tokenizer, e.prompt, e.chosen), row_tokens(tokenizer, e.prompt, e.rejected)
        return len(chosen.prompt) + len(chosen.answer), len(chosen.prompt) + len(chosen.answer) + len(rejected.answer)

    train = [pair(e) for e in data["train"]]
    evl = [pair(e) for e in data["eval"]]
    candidates = loglik_candidates(task)

    def scoring(examples: list[Example]) -> int:
        if candidates is not None:
            return sum(len(r.prompt) + len(r.answer) for e in examples
                       for r in (row_tokens(tokenizer, e.prompt, c) for c in candidates))
        return sum(len(prompt_ids(tokenizer, e.prompt)) + task.max_new_tokens for e in examples)

    return Tokens(
        rows={s: len(data[s]) for s in SPLITS},
        sft_row=sum(s for s, _ in train) / len(train),
        dpo_row=sum(d for _, d in train) / len(train),
        longest_sft=max(s for s, _ in train + evl),
        longest_dpo=max(d for _, d in train + evl),
        eval_sft=sum(s for s, _ in evl),
        eval_dpo=sum(d for _, d in evl),
        scoring={s: scoring(data[s]) for s in ("dev", "test")},
        reference=sum(d for _, d in train + evl),
    )


def stage_plan(task: str, stage: str, space: SearchSpace, tokens: Tokens) -> StagePlan:
    """One stage of one task: counts, training tokens, and forward tokens at both ends of early stopping."""
    most, best, evals, evals_best = steps(space)
    per_step = space.batch_size * space.gradient_accumulation_steps * (tokens.sft_row if stage == "sft"
                                                                      else tokens.dpo_row)
    per_eval = (tokens.eval_sft if stage == "sft" else tokens.eval_dpo) + tokens.scoring["dev"]
    once = tokens.scoring["test"] + (tokens.reference if stage == "dpo" else 0)
    return StagePlan(task, stage, space.num_trials(), most, best, evals, evals_best, per_step, most * per_step,
                     evals * per_eval + once, evals_best * per_eval + once)


def model_shape(name_or_path: str) -> dict[str, Any]:
    """Parameter count and block sizes of a model from its config alone (built on the meta device:
    no weights are read or downloaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {"model": model, "params": sum(p.numel() for p in model.parameters()), "hidden": text.hidden_size,
            "intermediate": getattr(text, "intermediate_size", 4 * text.hidden_size),
            "layers": text.num_hidden_layers, "vocab": text.vocab_size}


def lora_params(shape: dict[str, Any], study: Study) -> int:
    """Parameters of one LoRA adapter of the study's config on the model (counted on the meta device)."""
    from peft import get_peft_model

    from clinft_ray.modeling import peft_config

    peft = get_peft_model(shape["model"], peft_config(study.config.model))
    n = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    shape["model"] = peft.unload()
    return n


def training_dtype(study: Study, on_gpu: bool = True) -> str:
    """The dtype trials train in on a GPU of compute capability 8.0+ (`modeling.torch_dtype`'s auto), or
    on CPU (float32)."""
    dtype = study.config.model.dtype
    if dtype != "auto":
        return dtype
    return "bfloat16" if on_gpu else "float32"


def recomputes(study: Study, on_gpu: bool) -> bool:
    flag = study.config.model.activation_checkpointing
    return on_gpu if flag == "auto" else bool(flag)


def trial_memory(study: Study, shape: dict[str, Any], adapter: int, batch: int, longest: int, stage: str,
                 on_gpu: bool = True, workers: int = 1) -> dict[str, float]:
    """Bytes one trial's worker holds at the peak of a training step, by part (see the module's doc)."""
    cfg = study.config
    dtype = training_dtype(study, on_gpu)
    width = DTYPE_BYTES[dtype]
    shard = workers if cfg.resources.strategy == "fsdp" and workers > 1 else 1
    out = {"weights": shape["params"] * width / shard}
    if cfg.model.finetune == "lora":
        frozen = adapter if stage == "dpo" else 0
        out["weights"] += 4 * frozen
        out["trainable state"] = 4 * adapter * 3  # float32 adapter's gradients and AdamW's two states
    else:
        out["trainable state"] = shape["params"] * width * 3 / shard
    per_device = max(1, batch // workers)
    tokens = per_device * longest
    h, i, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    block = 12 * h + 5 * i + ((6 * h + i) if cfg.model.finetune == "lora" and cfg.model.lora.dropout else 0)
    if recomputes(study, on_gpu):
        out["activations"] = tokens * layers * h * width  # each layer's input
        out["recomputed layer"] = tokens * block * width  # in the backward pass, one layer at a time
    else:
        out["activations"] = tokens * layers * block * width
    # TRL's fused LM head projects tiles of 4,096 positions x 32,768 vocabulary rows, never the batch's
    # whole logits (`trl.trainer.utils.add_fused_lm_head`): one tile forward, one in the backward.
    out["LM head tiles"] = min(tokens, 4096) * min(shape["vocab"], 32768) * width * 2
    return out


def gb(n: float) -> str:
    """Bytes as GiB (MiB below one GiB), with three significant digits."""
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def make_plan(study: Study, data: dict[str, dict[str, list[Example]]], tokenizer: Any, on_gpu: bool = True) -> Plan:
    """Counts, tokens and per-trial memory of every stage of every task (no throughput yet)."""
    cfg = study.config
    tokens = {t.name: task_tokens(tokenizer, t, data[t.name]) for t in cfg.tasks}
    stages = [stage_plan(t.name, stage, space, tokens[t.name]) for t in cfg.tasks
              for stage, space in (("sft", study.sft_space), ("dpo", study.dpo_space))]
    shape = model_shape(cfg.model.name_or_path)
    adapter = lora_params(shape, study) if cfg.model.finetune == "lora" else 0
    gpus = cfg.resources.resolve_gpus(cluster_gpus=1.0)  # planned for GPUs: auto is one per worker
    workers = cfg.resources.workers(gpus)
    memory = {}
    for stage, space in (("sft", study.sft_space), ("dpo", study.dpo_space)):
        longest = max(getattr(tokens[t.name], f"longest_{stage}") for t in cfg.tasks)
        memory[stage] = trial_memory(study, shape, adapter, space.batch_size, longest, stage, on_gpu, workers)
    plan = Plan(stages, tokens, memory, gpus)
    plan.measured.update(params=shape["params"], adapter_params=adapter, shape=shape)
    return plan


def calibrate(study: Study, data: dict[str, dict[str, list[Example]]], tokenizer: Any, steps_: int = 3) -> dict[str, Any]:
    """A few real optimizer steps of the study's model on this machine's device (LoRA or full weights,
    activation checkpointing as configured, TRL's fused LM head as the trainers use it, AdamW), on a batch of the first task's training rows at
    the SFT space's per-device batch size; returns training and forward-only tokens per second and
    the memory a step held (CUDA's peak allocation, or on CPU what autograd kept for the backward
    plus weights, gradients and optimizer state)."""
    import torch
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from clinft_ray.evaluate import row_tokens
    from clinft_ray.modeling import device, load_base, peft_config

    cfg = study.config
    where = device()
    model = load_base(cfg.model).to(where)
    if recomputes(study, where == "cuda"):
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    add_fused_lm_head(model)  # before PEFT wraps it, as TRL does
    if cfg.model.finetune == "lora":
        model = get_peft_model(model, peft_config(cfg.model))
    model.train()
    task = cfg.tasks[0]
    rows = [row_tokens(tokenizer, e.prompt, e.chosen) for e in data[task.name]["train"][: study.sft_space.batch_size]]
    ids = [r.prompt + r.answer for r in rows]
    width = max(len(r) for r in ids)
    pad = tokenizer.pad_token_id or 0
    batch = torch.tensor([r + [pad] * (width - len(r)) for r in ids], device=where)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], device=where)
    labels = batch.masked_fill(mask == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    saved: dict[int, int] = {}

    def keep(t: Any) -> Any:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step(record: bool) -> None:
        if record:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = model(input_ids=batch, attention_mask=mask, labels=labels, fused_lm_head=True).loss
        else:
            loss = model(input_ids=batch, attention_mask=mask, labels=labels, fused_lm_head=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    def sync() -> None:
        if where == "cuda":
            torch.cuda.synchronize()

    step(record=True)  # warm-up, and what autograd keeps
    if where == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(steps_):
        step(record=False)
    sync()
    train_s = (time.perf_counter() - start) / steps_
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(steps_):
            model(input_ids=batch, attention_mask=mask)
        sync()
        forward_s = (time.perf_counter() - start) / steps_
    tokens = int(mask.sum())
    state = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None) + \
        sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    out = {"device": torch.cuda.get_device_name() if where == "cuda" else "CPU", "tokens": tokens, "width": width,
           "batch": len(ids), "train_tps": tokens / train_s, "forward_tps": tokens / forward_s,
           "kept_bytes": state + sum(saved.values())}
    if where == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def gpu_memory(given_gb: float | None) -> float | None:
    """Bytes of one GPU: as given, else this machine's first GPU, else None (unknown)."""
    if given_gb is not None:
        return given_gb * 2**30
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def fit_problem(study: Study, plan: Plan, have: float) -> str | None:
    """Why a trial does not fit a GPU of `have` bytes, naming what to change; None when it fits."""
    cfg = study.config
    for stage, parts in plan.memory.items():
        need = sum(parts.values())
        if need <= have:
            continue
        space = study.sft_space if stage == "sft" else study.dpo_space
        fixes = [f"{stage} space batch_size {space.batch_size} -> {max(1, space.batch_size // 2)} with "
                 f"gradient_accumulation_steps x2 (same effective batch)"]
        if not recomputes(study, True):
            fixes.append("model.activation_checkpointing: true")
        if cfg.model.finetune == "full":
            fixes.append("model.finetune: lora")
        fixes.append(f"a shorter model.max_length (now {cfg.model.max_length}; the longest row is what counts)")
        biggest = max(parts, key=parts.get)
        return (f"one {stage.upper()} trial needs about {gb(need)} per GPU ({biggest} {gb(parts[biggest])} the most) "
                f"but a GPU has {gb(have)}; change: {'; or '.join(fixes)}")
    return None


def hours(plan: Plan, s: StagePlan, best: bool) -> float | None:
    if not plan.train_tps:
        return None
    forward = plan.forward_tps or plan.train_tps * FORWARD_SPEEDUP
    train = (s.steps_best if best else s.steps_max) * s.tokens_per_step
    return (train / plan.train_tps + (s.forward_tokens_best if best else s.forward_tokens) / forward) / 3600


def render(study: Study, plan: Plan, have: float | None) -> list[str]:
    """The plan as the lines `clinft plan` prints."""
    cfg = study.config
    price = cfg.cost.gpu_hour_usd
    lines = []
    for name, t in plan.tokens.items():
        lines.append(f"{name}: " + ", ".join(f"{s} {n:,} rows" for s, n in t.rows.items()) +
                     f"; a train row is {t.sft_row:.0f} tokens on average for SFT, {t.dpo_row:.0f} for a DPO pair "
                     f"(longest {t.longest_sft} / {t.longest_dpo})")
    head = ["task", "stage", "trials", "trial-steps", "best case", "dev evals", "tokens/step", "train tokens",
            "forward tokens"]
    if plan.train_tps:
        head += ["hours", "GPU-hours"] + (["cost USD"] if price else [])
    rows = []
    for s in plan.stages:
        row = [s.task, s.stage.upper(), str(s.trials), f"{s.steps_max:,}", f"{s.steps_best:,}",
               f"{s.evals_max:,}", f"{s.tokens_per_step:,.0f}", f"{s.train_tokens:,.0f}", f"{s.forward_tokens:,.0f}"]
        if plan.train_tps:
            most, least = hours(plan, s, False), hours(plan, s, True)
            row += [f"{least:.3g}-{most:.3g}", f"{least * plan.gpus_per_trial:.3g}-{most * plan.gpus_per_trial:.3g}"]
            if price:
                row.append(f"{least * plan.gpus_per_trial * price:,.2f}-{most * plan.gpus_per_trial * price:,.2f}")
        rows.append(row)
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    lines += ["", *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows])]
    lines.append("(trial-steps: every trial to max_steps / early stopping's best case; hours and GPU-hours likewise, "
                 "best case first; trial start-up not included)")
    if plan.train_tps:
        src = plan.measured.get("calibration")
        said = (f"measured here on {src['device']}: {src['train_tps']:,.0f} training and {src['forward_tps']:,.0f} "
                f"forward tokens/s" if src else f"given: {plan.train_tps:,.0f} training tokens/s, forward "
                f"{FORWARD_SPEEDUP:g}x that")
        lines.append(f"throughput {said}; {plan.gpus_per_trial:g} GPU per trial")
    else:
        lines.append("hours and cost: pass --calibrate (a few real steps on this machine's device) or "
                     "--tokens-per-second N (training tokens per second of one trial on your GPU)")
    dtype = training_dtype(study)
    lora = f"LoRA r={cfg.model.lora.r}, {plan.measured['adapter_params']:,} adapter parameters" \
        if cfg.model.finetune == "lora" else "full weights"
    lines.append("")
    lines.append(f"memory of one trial on a GPU ({plan.measured['params']:,} parameters in {dtype}, {lora}, "
                 f"activation checkpointing {'on' if recomputes(study, True) else 'off'}):")
    for stage, parts in plan.memory.items():
        total = sum(parts.values())
        verdict = "" if have is None else (f" of {gb(have)}: fits" if total <= have else f" of {gb(have)}: DOES NOT FIT")
        lines.append(f"  {stage.upper()}: " + " + ".join(f"{k} {gb(v)}" for k, v in parts.items()) +
                     f" = {gb(total)}{verdict}")
    if have is None:
        lines.append("  (no GPU here: pass --gpu-memory-gb to check that a trial fits, in GiB, e.g. 80 for an A100 80GB)")
    if cal := plan.measured.get("calibration"):
        kept = cal.get("peak_bytes", cal["kept_bytes"])
        what = "CUDA peak allocation" if "peak_bytes" in cal else "weights, gradients, optimizer and saved activations"
        est = cal["estimate"]
        kept_est = sum(v for k, v in est.items() if k not in TRANSIENT)
        lines.append(f"  calibration step on {cal['device']} (batch {cal['batch']} x {cal['width']} tokens): {what} "
                     f"{gb(kept)}; estimated for that step {gb(kept_est)} kept + {gb(sum(est.values()) - kept_est)} "
                     "transient")
    return lines


def plan_study(study: Study, *, calibrate_here: bool = False, tokens_per_second: float | None = None,
               gpu_memory_gb: float | None = None) -> tuple[Plan, list[str], str | None]:
    """`clinft plan`: the plan of a validated study, its printed lines, and why a trial cannot fit the
    GPU (None when it fits or the GPU is unknown)."""
    from clinft_ray.modeling import load_tokenizer
    from clinft_ray.study import check_data

    data = check_data(study)
    tokenizer = load_tokenizer(study.config.model)
    plan = make_plan(study, data, tokenizer)
    if calibrate_here:
        cal = calibrate(study, data, tokenizer)
        cal["estimate"] = trial_memory(study, plan.measured["shape"], plan.measured["adapter_params"], cal["batch"],
                                       cal["width"], "sft", on_gpu=cal["device"] != "CPU")
        plan.measured["calibration"] = cal
        plan.train_tps, plan.forward_tps = cal["train_tps"], cal["forward_tps"]
    elif tokens_per_second:
        plan.train_tps = tokens_per_second
    have = gpu_memory(gpu_memory_gb)
    return plan, render(study, plan, have), None if have is None else fit_problem(study, plan, have)
