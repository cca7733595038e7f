"""The arithmetic of the benchmarks, against hand-worked values (the timings themselves are in
BENCHMARKS.md, never asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys

from helpers import REPO


def _dpo_cost():
    spec = importlib.util.spec_from_file_location("dpo_cost", REPO / "benchmarks" / "dpo_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dpo_cost"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_model_flops_count_the_head_at_answer_tokens_and_a_live_reference_forward():
    bench = _dpo_cost()
    opts = argparse.Namespace(preset="small", lora=True, peak_tflops=None)
    # small preset: body 4 x (2*384^2 + 2*384*384 + 3*384*1024) = 7,077,888; head 384 x 2,048 = 786,432
    # LoRA training: forward + input-gradient backward = 2 x the forward; attention 4*4*384*5 x 3
    assert bench.model_flops(10, 2, 5, opts) == 10 * (2 * 7_077_888 * 2 + 92_160) + 2 * 2 * 786_432 * 2
    assert bench.model_flops(10, 2, 5, opts, train=False) == 10 * (2 * 7_077_888 + 30_720) + 2 * 2 * 786_432
    full = argparse.Namespace(preset="small", lora=False, peak_tflops=None)
    assert bench.model_flops(1, 1, 0, full) == 2 * 7_077_888 * 3 + 2 * 786_432 * 3


def test_gpu_peaks_tell_pcie_from_sxm_parts():
    bench = _dpo_cost()
    opts = argparse.Namespace(peak_tflops=None)
    assert bench.peak_tflops("NVIDIA H100 PCIe", opts) == 756.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", opts) == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", opts) == 312.0
    assert math.isnan(bench.peak_tflops("Tesla T4", opts))
    assert bench.peak_tflops("Tesla T4", argparse.Namespace(peak_tflops=65.0)) == 65.0


def test_the_gpu_check_runs_end_to_end_on_cpu_in_its_dry_run():
    """benchmarks/gpu_check.py is what a lent GPU runs, once: its dry run (tiny model, a Ray of its
    own with a declared GPU) keeps every code path of it working, so that GPU time is not spent on a
    typo. It is also where Ray's side of `sweep.device_task` and `trial.hide_unheld_gpus` is tested:
    a task that held a GPU leaves no worker process behind, a CPU task keeps its warm worker, and a
    worker given no GPU sees none."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout[done.stdout.index("{\n"):])
    ran = {"dtype_auto", "scoring_head_fp32_error", "lora_bf16_update_survives", "merged_updates_kept",
           "gpu_task_releases_memory", "zero_gpu_worker_sees_gpus", "cpu_task_worker_reused"}
    assert {k for k in ran if out[k]["ok"] is True} == ran, json.dumps(out, indent=1)
    assert out["scoring_peak_growth_gb"]["skipped"] and out["dpo_cost"]["skipped"]  # GPU only
    assert out["all_ok"] is True and out["dtype_auto"]["value"] == "float32"
