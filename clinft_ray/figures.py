"""Figures for the report and MLflow (PNG, matplotlib's Agg backend: no display needed).

- `outcome_bars`: per task, grouped bars of base / SFT / DPO on test for each outcome's metric, with the
  paired p-values marked over brackets (like the paper's Figure 2; * = significant after the multiple-
  comparison correction);
- `eval_curves`: per task and stage, the eval-loss curve of every trial with the selected (trial, step)
  marked;
- `cost_bars`: device-hours per stage and task (GPU-hours, or CPU-hours on a machine without GPUs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clinft_ray.analysis import HOUR_PARTS, STAGES, part_hours

LABELS = {"base": "base", "sft": "SFT", "dpo": "DPO"}
COLORS = {"base": "#9e9e9e", "sft": "#1f77b4", "dpo": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def outcome_bars(task_name: str, task: dict[str, Any], rule: str, path: Path) -> Path:
    """Grouped bars of each outcome metric per stage on test, p-values over brackets; `rule` says
    what * marks (e.g. "p < 0.01")."""
    plt = _plt()
    metrics = list(task["outcomes"].items())
    fig, ax = plt.subplots(figsize=(max(4.0, 2.6 * len(metrics)), 4.2))
    width = 0.26
    top = 0.0
    for i, (outcome, metric) in enumerate(metrics):
        values = [task["stages"][s]["test"][metric] for s in STAGES]
        xs = [i + (k - 1) * width for k in range(3)]
        for x, v, s in zip(xs, values, STAGES, strict=True):
            ax.bar(x, v, width * 0.95, color=COLORS[s], label=LABELS[s] if i == 0 else None)
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        level = max(values)
        comps = {(c["a"], c["b"]): c for c in task["comparisons"] if c["outcome"] == outcome}
        scale = 5.0 if metric == "judge" else 1.0
        for a, b in (("base", "sft"), ("sft", "dpo"), ("base", "dpo")):
            c = comps[(a, b)]
            level += 0.09 * scale
            xa, xb = xs[STAGES.index(a)], xs[STAGES.index(b)]
            ax.plot([xa, xa, xb, xb], [level - 0.02 * scale, level, level, level - 0.02 * scale], color="black", lw=0.8)
            star = "*" if c["significant"] else ""
            ax.text((xa + xb) / 2, level, f"p={c['p_value']:.2g}{star}", ha="center", va="bottom", fontsize=7)
        top = max(top, level + 0.08 * scale)
    ax.set_xticks(range(len(metrics)), [m for _, m in metrics])
    ax.set_ylim(0, top)
    ax.set_ylabel("test")
    ax.set_title(f"{task_name}: base vs SFT vs DPO on test (* {rule})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def eval_curves(task_name: str, stage: str, curves: dict[str, list[tuple[int, float]]], selected: tuple[str, int],
                path: Path) -> Path:
    """Eval loss against optimizer step for every trial of a stage; the selected point is starred."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for trial, points in sorted(curves.items()):
        if not points:
            continue
        steps, losses = zip(*points, strict=True)
        chosen = trial == selected[0]
        ax.plot(steps, losses, marker="o", ms=3, lw=2.2 if chosen else 1.0, alpha=1.0 if chosen else 0.6,
                label=trial)
        if chosen and selected[1] in steps:
            ax.plot(selected[1], losses[steps.index(selected[1])], marker="*", ms=16, color="black", zorder=5,
                    label=f"selected (step {selected[1]})")
    ax.set_xlabel("step")
    ax.set_ylabel("eval/loss")
    ax.set_title(f"{task_name}: {LABELS[stage]} trials", fontsize=10)
    ax.legend(fontsize=6, frameon=False, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


PARTS = dict(zip(HOUR_PARTS, [("", 1.0), ("xx", 0.8), ("//", 0.65), ("..", 0.5)], strict=True))  # hatch, opacity


def cost_bars(results: dict[str, Any], path: Path) -> Path:
    """Device-hours per stage for every task (GPU-hours where any were used, else CPU-hours), each
    bar stacked by what the hours paid for: training, dev scoring, DPO's reference pass, test scoring."""
    plt = _plt()
    tasks = list(results["tasks"])
    unit = "gpu_hours" if any(t["gpu_hours"] for t in results["tasks"].values()) else "cpu_hours"
    fig, ax = plt.subplots(figsize=(max(4.0, 1.8 * len(tasks)), 3.8))
    width = 0.26
    for k, s in enumerate(STAGES):
        xs = [i + (k - 1) * width for i in range(len(tasks))]
        bottom = [0.0] * len(tasks)
        for part, (hatch, opacity) in PARTS.items():
            values = []
            for t in tasks:
                st = results["tasks"][t]["stages"][s]
                h = part_hours(st, part, unit)
                values.append(h if h is not None else st[unit] if part == "train" else 0.0)  # results without the split
            label = LABELS[s] if part == "train" else (part.replace("_", " ") if k == 2 else None)
            ax.bar(xs, values, width * 0.95, bottom=bottom, color=COLORS[s], alpha=opacity, hatch=hatch, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(unit.replace("_", "-"))
    ax.set_title("cost per stage", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
