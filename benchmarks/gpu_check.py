"""One prepared check of clinft-ray's GPU paths, run where a GPU is lent: prints one JSON.

    python benchmarks/gpu_check.py               # on a GPU machine (about 4-6 minutes on one H100/H200)
    python benchmarks/gpu_check.py --dry-run     # on CPU: the same code on a tiny model (what CI runs)

Needs clinft-ray importable (`pip install -e .`, or the wheels of its stack carried to the machine:
ray, transformers, trl, peft, accelerate, datasets, pyarrow; PyTorch is the machine's own) and, for
`system/gpu_utilization_pct`, nvidia-ml-py. Nothing is downloaded: the models are random-weight Llamas
built here (8B-shaped: Llama-3-8B's layers, heads and 128,256-token vocabulary, bf16).

Each check is {"value", "expected", "ok"}; `ok` is null where a check cannot run (no GPU, or a
library missing) and says why in "skipped". The checks (issue #13's, in its numbering):

1. `gpu_task_releases_memory`: a Ray task holding the GPU allocates 8 GB and ends; the GPU's used
   memory (NVML, or torch's free memory seen from here) returns to within 1 GB of what it was, because
   the worker exits (`sweep.device_task`: max_calls=1). Dry run: Ray with a declared GPU, and the
   worker's process is gone.
2. `scoring_peak_growth_gb`: peak CUDA memory of loglik scoring (`evaluate._answer_logprob_sums`,
   8B-shaped, batch 16, 4 answer tokens) at 1,024-token prompts minus at 256: activations only,
   expected < 3 GB (full-vocabulary bf16 logits with their fp32 log-softmax would add ~15 GB).
   `scoring_head_fp32_error`: |score - fp32-head score| over |bf16-logits score - fp32-head score|,
   expected < 0.01.
3. (TRL's model hash) is a CPU test only (tests/unit/test_packed_dpo.py); no GPU figure.
4. `lora_bf16_update_survives`: on a bf16 model of the 8B's width and vocabulary (2 layers), an adapter of delta ~1e-5 loads back
   unmerged with bit-equal logits (expected true), where merging it keeps under 10% of the weights'
   updates (`merged_updates_kept`, expected < 0.1).
5. `zero_gpu_worker_sees_gpus`: torch.cuda.device_count() in a Ray task given no GPU: expected 0.
6. (DDP scoring on rank 0) is a CPU test with gloo (tests/unit/test_trial.py).
7. `dtype_auto`: what `model.dtype: auto` picks here (bfloat16 on A100/H100/H200, float32 on CPU);
   `gpu_stats_peak_per_interval`: GpuStats' second read after a freed 4 GB tensor is below its
   first (expected true).
Then (issue #18) `dpo_cost`: the 8B preset of `benchmarks/dpo_cost.py` (SFT, clinft-ray's DPO and
TRL's stock DPO step times, tokens/s and MFU, prompt 1024 / answer 80 and prompt 256 / answer 4),
run as a subprocess with `--dpo-cost-timeout` seconds (skipped in the dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
GB = 2**30
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0}
# The LoRA check needs the 8B model's width and vocabulary, not its depth (and saves and reloads it).
LLAMA3_8B_TWO_LAYERS = {**LLAMA3_8B, "num_hidden_layers": 2}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 32000}


def check(value: Any, expected: str, ok: bool | None, **extra: Any) -> dict[str, Any]:
    return {"value": value, "expected": expected, "ok": ok, **extra}


def skipped(why: str) -> dict[str, Any]:
    return {"value": None, "expected": None, "ok": None, "skipped": why}


def build_llama(shape: dict[str, Any], device: str, dtype: torch.dtype, folder: Path | None = None) -> Any:
    """A random-weight Llama of `shape` on `device`; saved to `folder` when given (for `load_model`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model


# -- 1 and 5: Ray tasks ---------------------------------------------------------------------------------


def _allocate_and_report() -> dict[str, Any]:
    """Ray task body: hold 8 GB on the GPU (if any) and return this worker's pid."""
    block = torch.empty(8 * GB, dtype=torch.uint8, device="cuda") if torch.cuda.is_available() else None
    del block
    return {"pid": os.getpid()}


def _visible_gpus() -> int:
    from clinft_ray.trial import hide_unheld_gpus

    hide_unheld_gpus()
    return torch.cuda.device_count()


def _gpu_used_bytes() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return float(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # no nvidia-ml-py: torch's view from this process
        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return float(total - free)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def ray_checks(gpu: bool) -> dict[str, Any]:
    import ray

    from clinft_ray.study import ray_environment
    from clinft_ray.sweep import device_task

    ray_environment()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        before = _gpu_used_bytes()
        held, _ = device_task(_allocate_and_report, {"CPU": 1, "GPU": 1})
        deadline = time.monotonic() + 60
        while _alive(held["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the driver's view of the freed memory
        after = _gpu_used_bytes()
        exited = not _alive(held["pid"])
        if gpu and before is not None and after is not None:
            grown = (after - before) / GB
            released = check(round(grown, 3), "< 1 GB more used than before the task", grown < 1.0,
                             worker_exited=exited)
        else:
            released = check(exited, "the task's worker process exits", exited, note="no GPU: process only")
        seen, _ = device_task(_visible_gpus, {"CPU": 1})
        again, _ = device_task(_allocate_and_report, {"CPU": 1})
        warm, _ = device_task(_allocate_and_report, {"CPU": 1})
        reused = again["pid"] == warm["pid"]
        return {"gpu_task_releases_memory": released,
                "zero_gpu_worker_sees_gpus": check(seen, "0", seen == 0),
                "cpu_task_worker_reused": check(reused, "true: a CPU task keeps its warm worker", reused)}
    finally:
        ray.shutdown()


# -- 2: scoring ---------------------------------------------------------------------------------------------


def scoring_checks(shape: dict[str, Any], device: str, prompts: tuple[int, int], batch: int) -> dict[str, Any]:
    from clinft_ray.evaluate import _answer_logprob_sums

    model = build_llama(shape, device, torch.bfloat16)
    vocab, answer = shape["vocab_size"], [11, 12, 13, 1]
    out: dict[str, Any] = {}
    peaks = []
    for length in prompts:
        rows = [[(7 * r + i) % (vocab - 2) + 2 for i in range(length)] + answer for r in range(batch)]
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _answer_logprob_sums(model, rows, [len(answer)] * batch, 0)
        if device == "cuda":
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / GB)
    if peaks:
        growth = peaks[1] - peaks[0]
        out["scoring_peak_growth_gb"] = check(round(growth, 3), "< 3 GB (full-vocabulary logits would add ~15 GB)",
                                              growth < 3.0, peaks_gb=[round(p, 3) for p in peaks], prompts=prompts)
    else:
        out["scoring_peak_growth_gb"] = skipped("no GPU (tests/unit/test_evaluate.py counts the tensors on CPU)")

    ids = torch.tensor([rows[0]], device=device)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
        fp32 = torch.log_softmax(hidden.float() @ model.lm_head.weight.float().T, dim=-1)
        bf16 = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1).float()
    targets = ids[0, 1:].unsqueeze(-1)
    n = len(answer)
    fp32_sum, bf16_sum = (float(x.gather(-1, targets)[-n:].sum()) for x in (fp32, bf16))
    ours = _answer_logprob_sums(model, [rows[0]], [n], 0)[0]
    ratio = abs(ours - fp32_sum) / max(abs(bf16_sum - fp32_sum), 1e-12)
    out["scoring_head_fp32_error"] = check(round(ratio, 5), "< 0.01 of the bf16 logits' error", ratio < 0.01,
                                           bf16_logits_error=round(abs(bf16_sum - fp32_sum), 5))
    del model
    return out


# -- 4: LoRA in bf16 ----------------------------------------------------------------------------------------


def lora_check(shape: dict[str, Any], device: str, scratch: Path) -> dict[str, Any]:
    from peft import PeftModel, get_peft_model

    from clinft_ray.config import ModelConfig
    from clinft_ray.modeling import load_base, load_model, peft_config, write_manifest

    build_llama(shape, "cpu", torch.bfloat16, scratch / "base")
    cfg = ModelConfig(name_or_path=str(scratch / "base"), dtype="bfloat16", finetune="lora")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]], device=device)

    def logits(model: Any) -> torch.Tensor:
        with torch.no_grad():
            return model.to(device).eval()(input_ids=ids).logits

    torch.manual_seed(1)
    trained = get_peft_model(load_base(cfg), peft_config(cfg))
    for name, param in trained.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn_like(param) * 1e-5
    expected = logits(trained)
    trained.save_pretrained(scratch / "sft")
    write_manifest(scratch / "sft", cfg, parent=None, init_from=None, step=1)
    del trained
    same = bool(torch.equal(logits(load_model(cfg, scratch / "sft")), expected))
    key = "model.layers.0.self_attn.q_proj.weight"
    merged = PeftModel.from_pretrained(load_base(cfg), scratch / "sft").merge_and_unload().state_dict()[key]
    kept = float((merged != load_base(cfg).state_dict()[key]).float().mean())
    return {"lora_bf16_update_survives": check(same, "true: the loaded model's logits equal the trained one's", same),
            "merged_updates_kept": check(round(kept, 4), "< 0.1 (why adapters stay unmerged)", kept < 0.1)}


# -- 7: dtype and GPU stats ---------------------------------------------------------------------------------


def dtype_and_stats_checks(gpu: bool) -> dict[str, Any]:
    from clinft_ray.config import ModelConfig
    from clinft_ray.modeling import torch_dtype
    from clinft_ray.trial import GpuStats

    picked = str(torch_dtype(ModelConfig(name_or_path="m"))).removeprefix("torch.")
    native = gpu and torch.cuda.is_bf16_supported(including_emulation=False)
    want = "bfloat16" if native else ("float16" if gpu else "float32")
    out = {"dtype_auto": check(picked, want, picked == want,
                               device=torch.cuda.get_device_name() if gpu else "cpu")}
    if not gpu:
        out["gpu_stats_peak_per_interval"] = skipped("no GPU (tests/unit/test_trial.py checks the reset on CPU)")
        return out
    stats = GpuStats()
    block = torch.empty(4 * GB, dtype=torch.uint8, device="cuda")
    del block
    first = stats.read()["system/gpu_peak_memory_gb"]
    second = stats.read()["system/gpu_peak_memory_gb"]
    out["gpu_stats_peak_per_interval"] = check([round(first, 3), round(second, 3)], "second < first",
                                               second < first)
    return out


# -- #18: step cost -----------------------------------------------------------------------------------------


def dpo_cost(timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "dpo_cost.py"), "--device", "cuda", "--preset", "8b",
               "--shapes", "1024:80:4,256:4:8", "--rounds", "2", "--steps", "2"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return skipped(f"dpo_cost.py did not finish in {timeout_s:.0f} s")
    if done.returncode:
        return skipped(f"dpo_cost.py exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout[done.stdout.index("{\n"):])


def run(name: str, fn: Callable[[], dict[str, Any]], out: dict[str, Any]) -> None:
    """One group of checks; a group that raises is recorded as such and the others still run."""
    start = time.monotonic()
    try:
        out.update(fn())
    except Exception as exc:  # noqa: BLE001 (the JSON says what broke; the next group runs)
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    out.setdefault("seconds", {})[name] = round(time.monotonic() - start, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: check the script itself")
    parser.add_argument("--dpo-cost-timeout", type=float, default=240.0)
    opts = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not opts.dry_run
    if not gpu and not opts.dry_run:
        parser.error("no GPU here: pass --dry-run to run the checks on CPU")
    from clinft_ray.trial import quiet_libraries

    quiet_libraries()
    device, shape = ("cuda", LLAMA3_8B) if gpu else ("cpu", TINY)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if gpu else "cpu (dry run)",
                           "torch": torch.__version__, "shape": "llama3-8b" if gpu else "tiny"}
    with tempfile.TemporaryDirectory() as scratch:
        run("dtype_and_stats", lambda: dtype_and_stats_checks(gpu), out)
        run("scoring", lambda: scoring_checks(shape, device, (256, 1024) if gpu else (16, 64), 16 if gpu else 4), out)
        run("lora", lambda: lora_check(LLAMA3_8B_TWO_LAYERS if gpu else TINY, device, Path(scratch)), out)
        if gpu:
            torch.cuda.empty_cache()
        run("ray", lambda: ray_checks(gpu), out)
    out["dpo_cost"] = dpo_cost(opts.dpo_cost_timeout) if gpu else skipped("dry run")
    checks = [v for v in out.values() if isinstance(v, dict) and "ok" in v]
    out["all_ok"] = all(c["ok"] is not False for c in checks)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
