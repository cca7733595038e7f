"""The study's outputs: `results.json`, `outcomes.jsonl` and `report.md`.

`outcomes.jsonl` holds one line per test example per stage (task, stage, example id, correct) and
nothing else: no prompt, answer or generated text. `report.md` is the table to paste into a paper:
per task, the test metric of base / SFT / DPO with the paired p-values, and the cost of each stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGES = ("base", "sft", "dpo")


def _p(c: dict[str, Any]) -> str:
    return f"{c['p_value']:.3g}{'*' if c['significant'] else ''}"


def results_table(results: dict[str, Any]) -> str:
    """Markdown: per task and outcome, the test metric per stage and the paired p-values
    (* = below the Bonferroni threshold)."""
    lines = [
        "| task | metric | base | SFT | DPO | test | p base-SFT | p SFT-DPO | p base-DPO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in results["tasks"].items():
        for outcome, m in t["outcomes"].items():
            vals = " | ".join(f"{t['stages'][s]['test'][m]:.3f}" for s in STAGES)
            comps = [c for c in t["comparisons"] if c["outcome"] == outcome]
            ps = " | ".join(_p(c) for c in comps)
            lines.append(f"| {name} | {m} | {vals} | {comps[0]['test']} | {ps} |")
    return "\n".join(lines)


def metrics_table(results: dict[str, Any]) -> str:
    """Markdown: every test metric of every stage (accuracy beside F1, ROUGE-L beside the judge)."""
    lines = ["| task | stage | metrics on test |", "|---|---|---|"]
    for name, t in results["tasks"].items():
        for s in STAGES:
            ms = ", ".join(f"{k} {v:.3f}" for k, v in t["stages"][s]["test"].items())
            lines.append(f"| {name} | {s} | {ms} |")
    return "\n".join(lines)


def cost_table(results: dict[str, Any]) -> str:
    """Markdown: trials, GPU-hours and CPU-hours per stage, and DPO's cost over SFT's."""
    lines = ["| task | stage | trials | GPU-hours | CPU-hours |", "|---|---|---|---|---|"]
    for name, t in results["tasks"].items():
        for s in STAGES:
            st = t["stages"][s]
            lines.append(f"| {name} | {s} | {st['trials']} | {st['gpu_hours']:.4f} | {st['cpu_hours']:.4f} |")
    ratios = [
        f"- {name}: DPO/SFT cost = {t['dpo_sft_cost_ratio']:.2f}x ({t['cost_basis'].replace('_', '-')})"
        for name, t in results["tasks"].items() if t["dpo_sft_cost_ratio"] is not None
    ]
    return "\n".join(lines + [""] + ratios)


def selection_table(results: dict[str, Any]) -> str:
    lines = ["| task | stage | selected | step | dev |", "|---|---|---|---|---|"]
    for name, t in results["tasks"].items():
        for s in ("sft", "dpo"):
            sel = t["stages"][s]["selected"]
            hp = ", ".join(f"{k}={sel[k]:g}" for k in ("learning_rate", "beta") if k in sel)
            lines.append(f"| {name} | {s} | {hp} | {sel['step']} | {t['stages'][s]['dev'][t['metric']]:.3f} |")
    return "\n".join(lines)


def render_report(results: dict[str, Any]) -> str:
    return "\n\n".join([
        f"# {results['study']}: base vs SFT vs DPO on test",
        results_table(results),
        f"Paired tests on test outcomes (McNemar for correct/incorrect, paired t for scores); * marks "
        f"p < {results['threshold']:.3g} (alpha {results['alpha']} / {results['comparisons_m']}, Bonferroni).",
        metrics_table(results),
        "## Selected on dev",
        selection_table(results),
        "## Cost",
        cost_table(results),
        "",
    ])


def write_outputs(out_dir: Path, results: dict[str, Any], outcomes: list[dict[str, Any]]) -> list[Path]:
    """Write the three files into `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths = [out / "results.json", out / "outcomes.jsonl", out / "report.md"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    paths[1].write_text("".join(json.dumps(o) + "\n" for o in outcomes))
    paths[2].write_text(render_report(results))
    return paths
