"""What a DPO step costs next to an SFT step: clinft-ray's DPO and TRL's stock DPO, measured in one run.

    python benchmarks/dpo_cost.py                                # CPU, both shapes: 1.5-3 minutes on 2 idle cores
    python benchmarks/dpo_cost.py --device cuda --preset 8b --batch-size 8   # 8B-shaped Llama, bf16, LoRA, one GPU

For each shape (prompt tokens : answer tokens : batch size) it trains the same random-weight Llama on
the same rows with the same optimizer (AdamW; TRL's default arguments as clinft-ray's trials use them,
with activation checkpointing on, as trials on a GPU run; on CPU trials run without it) and times optimizer steps with a `TrainerCallback` (forward,
backward and optimizer step). Each method gets `--rounds` `train()` calls of `--warmup` + `--steps`
steps; warm-up steps are dropped and the median of the rest is reported:

- `sft_step_s`: TRL `SFTTrainer` on prompt + chosen, loss on the answer (clinft-ray's SFT trial);
- `dpo_step_s`: clinft-ray's DPO step, `PackedDPOTrainer` reading the shared precomputed reference
  log-probs (`packed_step_s`), plus the reference's share: the measured time of one packed reference
  forward over a batch (`ref_forward_s`) divided by the 12 trials of the paper's DPO grid that share
  it (`--trials`);
- `trl_dpo_step_s`: TRL's `DPOTrainer` as is: chosen and rejected as two rows, the reference run live
  every step (a second copy for full fine-tuning; the adapter disabled for LoRA);
- `ratio` = dpo / sft and `trl_ratio` = trl_dpo / sft, from the medians; `ratio_of_fastest` and
  `trl_ratio_of_fastest` from each method's fastest step, the least disturbed on a shared machine.

On CPU the three trainers take turns, one `train()` call each per round, so that load from other
processes falls on all three alike; `step_times_s` lists every measured step.

The CPU preset is compute-bound on purpose: hidden 384 and 4 layers make every matmul a thousand or
more tokens by 384+ wide, which oneDNN runs near its peak, so Python and dispatch overheads are small;
a vocabulary of 2048 keeps the LM head (2*384*2048 = 1.6 MFLOPs a token) to about 10% of a token's
forward (15.7 MFLOPs), close to real models (Llama-3-8B: 1.05 of 16 GFLOPs), instead of letting a
toy-sized layer stack make the head dominate. The 8B preset reports tokens/s and MFU (model FLOPs of
the tokens each method feeds the model, the LM head at the answer tokens only and TRL's live
reference forward included, over the GPU's dense bf16 peak, PCIe and SXM parts told apart); it has not been run here
(no GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

PRESETS: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 6,
              "num_key_value_heads": 6, "vocab_size": 2048},
    # Llama-3-8B's shape (random weights)
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
}
# NVIDIA's dense bf16 tensor peaks, most specific name first: the PCIe and NVL H100s run well below the
# SXM part. A GPU not listed gets NaN: pass --peak-tflops.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0)]


@dataclass(frozen=True)
class Shape:
    prompt: int
    answer: int
    batch: int

    @property
    def name(self) -> str:
        return f"prompt{self.prompt}_answer{self.answer}"

    @classmethod
    def parse(cls, text: str, batch: int | None) -> Shape:
        prompt, answer, default_batch = (int(x) for x in text.split(":"))
        return cls(prompt, answer, batch or default_batch)


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step (after the batch is fetched, through the
    optimizer step)."""

    def __init__(self, cuda: bool):
        self.cuda, self.times, self._start = cuda, [], 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._start = self._now()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.times.append(self._now() - self._start)


def word_tokenizer(vocab_size: int) -> Any:
    """One token per whitespace-separated word `w<i>`, so row lengths are exact token counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")


def make_rows(shape: Shape, n: int, vocab_size: int, seed: int) -> list[dict[str, str]]:
    """Preference rows of exactly `shape` tokens: answers have `answer - 1` words, TRL appends EOS."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab_size - 2)}" for _ in range(k))

    return [{"prompt": words(shape.prompt), "chosen": " " + words(shape.answer - 1),
             "rejected": " " + words(shape.answer - 1)} for _ in range(n)]


def build_model(preset: str, device: str, dtype: torch.dtype, max_positions: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1, tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def trainer_args(cls: type, out: str, steps: int, batch: int, dtype: torch.dtype, **extra: Any) -> Any:
    """clinft-ray's trial arguments (`trial.trainer_kwargs`, for a space of `steps` steps of `batch`
    rows), without evaluation or logging."""
    from clinft_ray.spaces import SearchSpace
    from clinft_ray.trial import trainer_kwargs

    space = SearchSpace(stage="sft", learning_rate={"grid": [1e-5]}, max_steps=steps, eval_steps=steps, batch_size=batch)
    common = trainer_kwargs(space, {"learning_rate": 1e-5}, 0, dtype, out, activation_checkpointing=True)
    return cls(**{**common, "eval_strategy": "no", "logging_steps": 10_000, "dataloader_drop_last": True}, **extra)


def timed_steps(trainer: Any, opts: argparse.Namespace) -> list[float]:
    """One `train()` call of `warmup + steps` optimizer steps; the times of the steps after the warm-up."""
    timer = StepTimer(opts.device == "cuda")
    trainer.add_callback(timer)
    try:
        trainer.train()
    finally:
        trainer.remove_callback(timer)
    return timer.times[opts.warmup :]


def timed_reference(trainer: Any, batch_size: int, opts: argparse.Namespace) -> list[float]:
    """Times of the packed reference forward over one training batch, as the shared precompute runs
    it (no grad, the training precision), after the warm-up."""
    rows = [trainer.train_dataset[i] for i in range(batch_size)]
    batch = {k: v.to(trainer.accelerator.device) for k, v in trainer.data_collator(rows).items()}
    timer = StepTimer(opts.device == "cuda")
    for _ in range(opts.warmup + opts.steps):
        timer.on_step_begin()
        with trainer.compute_loss_context_manager():
            trainer.compute_ref_log_probs(trainer.model, batch)
        timer.on_step_end()
    return timer.times[opts.warmup :]


def free() -> None:
    """Return a trainer's memory before building the next model (the 8B preset needs it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def builders(shape: Shape, opts: argparse.Namespace, scratch: str, out: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """How to build each method's trainer over the same rows, model and optimizer."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from clinft_ray.packed_dpo import PackedDPOTrainer
    from clinft_ray.reference import compute_reference_logps, with_reference

    cuda = opts.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    vocab = PRESETS[opts.preset]["vocab_size"]
    steps, batch = opts.warmup + opts.steps, shape.batch
    rows = make_rows(shape, steps * batch, vocab, seed=0)
    tok = word_tokenizer(vocab)
    positions = shape.prompt + 2 * shape.answer + 8

    def model() -> Any:
        return build_model(opts.preset, opts.device, dtype, positions, seed=0)

    def lora() -> Any:
        return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear") if opts.lora else None

    def args(cls: type, **extra: Any) -> Any:
        return trainer_args(cls, scratch, steps, batch, dtype, max_length=None, **extra)

    def sft() -> Any:
        sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
        trainer = SFTTrainer(model=model(), args=args(SFTConfig), train_dataset=Dataset.from_list(sft_rows),
                             processing_class=tok, peft_config=lora())
        assert len(trainer.train_dataset[0]["input_ids"]) == shape.prompt + shape.answer, "rows are not the shape"
        out["activation_checkpointing"] = trainer.args.gradient_checkpointing
        return trainer

    def packed() -> Any:
        # The reference values once, as the sweep computes them; the trial reads them.
        start = time.perf_counter()
        reference = compute_reference_logps(model(), tok, {"train": rows}, args(DPOConfig,
                                            precompute_ref_batch_size=batch))["train"]
        out["ref_precompute_total_s"] = time.perf_counter() - start
        free()
        trainer = PackedDPOTrainer(model=model(), args=args(DPOConfig, precompute_ref_log_probs=True),
                                   train_dataset=Dataset.from_list(with_reference(rows, reference)),
                                   processing_class=tok, peft_config=lora())
        ds = trainer.train_dataset
        assert (len(ds[0]["prompt_ids"]), len(ds[0]["chosen_ids"])) == (shape.prompt, shape.answer)
        return trainer

    def trl_dpo() -> Any:
        return DPOTrainer(model=model(), ref_model=None if opts.lora else model(), args=args(DPOConfig),
                          train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora())

    return {"sft": sft, "packed": packed, "trl_dpo": trl_dpo}


def measure(shape: Shape, opts: argparse.Namespace) -> dict[str, Any]:
    """One shape: SFT, clinft-ray DPO (+ the reference's share), stock TRL DPO.

    On CPU the three trainers live side by side and take turns, one `train()` call each per round, so
    that a burst of load from other processes on a shared machine hits all three alike. On a GPU
    (no such noise, and three 8B models would not fit) each is built, timed over all rounds and freed.
    """
    from clinft_ray.trial import without_printer

    out: dict[str, Any] = {"prompt_tokens": shape.prompt, "answer_tokens": shape.answer, "batch_size": shape.batch}
    times: dict[str, list[float]] = {"sft": [], "packed": [], "ref_forward": [], "trl_dpo": []}

    def run(name: str, trainer: Any) -> None:
        times[name] += timed_steps(trainer, opts)
        if name == "packed":
            times["ref_forward"] += timed_reference(trainer, shape.batch, opts)

    with tempfile.TemporaryDirectory() as scratch:
        build = builders(shape, opts, scratch, out)
        if opts.device == "cpu":
            trainers = {name: without_printer(make()) for name, make in build.items()}
            for _ in range(opts.rounds):
                for name, trainer in trainers.items():
                    run(name, trainer)
            del trainers
        else:
            for name, make in build.items():
                trainer = without_printer(make())
                for _ in range(opts.rounds):
                    run(name, trainer)
                del trainer
                free()

    median = {name: statistics.median(t) for name, t in times.items()}
    out.update({
        "sft_step_s": median["sft"],
        "dpo_step_s": median["packed"] + median["ref_forward"] / opts.trials,
        "trl_dpo_step_s": median["trl_dpo"],
        "packed_step_s": median["packed"],
        "ref_forward_s": median["ref_forward"],
        "measured_steps_per_method": len(times["sft"]),
    })
    out["ratio"] = out["dpo_step_s"] / out["sft_step_s"]
    out["trl_ratio"] = out["trl_dpo_step_s"] / out["sft_step_s"]
    # The fastest step of each is the least disturbed by other processes on a shared machine.
    fastest = {name: min(t) for name, t in times.items()}
    out["ratio_of_fastest"] = (fastest["packed"] + fastest["ref_forward"] / opts.trials) / fastest["sft"]
    out["trl_ratio_of_fastest"] = fastest["trl_dpo"] / fastest["sft"]
    out["step_times_s"] = {name: [round(x, 4) for x in t] for name, t in times.items()}
    if opts.device == "cuda":
        out.update(throughput(shape, opts, out))
    return out


def model_flops(tokens: int, scored: int, context: float, opts: argparse.Namespace, train: bool = True) -> float:
    """Model FLOPs of one pass over `tokens` tokens of mean attention context `context`, `scored` of
    which go through the LM head (TRL's fused head projects only the positions with a label: the
    answer tokens). Forward 2 x parameters; backward twice the forward for full fine-tuning, once
    for LoRA (no weight gradients of the frozen base, input gradients only); attention 4 x layers x
    hidden x context forward, twice that backward. Activation recompute is not counted, as usual
    for MFU; `train=False` is a forward alone (a live reference)."""
    p = PRESETS[opts.preset]
    h, layers, inter, vocab = p["hidden_size"], p["num_hidden_layers"], p["intermediate_size"], p["vocab_size"]
    kv = h * p["num_key_value_heads"] // p["num_attention_heads"]
    body, head = layers * (2 * h * h + 2 * h * kv + 3 * h * inter), h * vocab
    factor = 1 + ((1 if opts.lora else 2) if train else 0)  # forward, plus backward
    attention = 4 * layers * h * context * (3 if train else 1)
    return tokens * (2 * body * factor + attention) + scored * 2 * head * factor


def peak_tflops(name: str, opts: argparse.Namespace) -> float:
    return opts.peak_tflops or next((v for key, v in PEAK_BF16_TFLOPS if key in name), math.nan)


def throughput(shape: Shape, opts: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    """Tokens fed to the model per second and MFU, per method (GPU runs only). TRL's stock DPO is
    counted with the live reference forward it runs every step (over the same rows, no backward);
    clinft-ray's packed step reads the shared reference (its share is in `dpo_step_s`, not here)."""
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, opts)
    b, p, a = shape.batch, shape.prompt, shape.answer
    flops = {
        "sft": (b * (p + a), model_flops(b * (p + a), b * a, (p + a) / 2, opts)),
        "dpo": (b * (p + 2 * a + 1), model_flops(b * (p + 2 * a + 1), 2 * b * a, (p + 2 * a + 1) / 2, opts)),
        "trl_dpo": (2 * b * (p + a), model_flops(2 * b * (p + a), 2 * b * a, (p + a) / 2, opts)
                    + model_flops(2 * b * (p + a), 2 * b * a, (p + a) / 2, opts, train=False)),
    }
    res: dict[str, Any] = {"gpu": name, "peak_bf16_tflops": peak}
    for method, (tokens, model_flops_per_step) in flops.items():
        seconds = out["packed_step_s" if method == "dpo" else f"{method}_step_s"]
        res[f"{method}_tokens_per_s"] = tokens / seconds
        res[f"{method}_mfu"] = model_flops_per_step / seconds / (peak * 1e12)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--shapes", default="256:4:4,1024:80:2",
                        help="prompt_tokens:answer_tokens:batch_size, comma-separated")
    parser.add_argument("--batch-size", type=int, default=None, help="one batch size for every shape")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per train() call")
    parser.add_argument("--rounds", type=int, default=4, help="train() calls per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--trials", type=int, default=12, help="DPO trials sharing one reference pass")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                        help="train LoRA adapters (default: on for 8b, off for small)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    opts = parser.parse_args(argv)
    opts.lora = opts.preset == "8b" if opts.lora is None else opts.lora
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    torch.set_num_threads(opts.threads)

    import peft
    import transformers
    import trl

    from clinft_ray.trial import quiet_libraries

    quiet_libraries()
    shapes = [Shape.parse(s, opts.batch_size) for s in opts.shapes.split(",")]
    p = PRESETS[opts.preset]
    result: dict[str, Any] = {
        "meta": {
            "preset": opts.preset, **p, "lora": opts.lora, "device": opts.device,
            "dtype": "bfloat16" if opts.device == "cuda" else "float32",
            "params_millions": round(sum(x.numel() for x in build_model(opts.preset, "meta", torch.float32, 64, 0)
                                         .parameters()) / 1e6, 2),
            "rounds": opts.rounds, "steps_per_round": opts.steps, "warmup_steps_per_round": opts.warmup,
            "reference_shared_by_trials": opts.trials,
            "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__,
        },
    }
    result["meta"]["load_average_1min_at_start"] = os.getloadavg()[0]  # other processes on this machine
    for shape in shapes:
        result[shape.name] = measure(shape, opts)
        print(json.dumps({shape.name: result[shape.name]}), flush=True)
    result["meta"]["load_average_1min_at_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
