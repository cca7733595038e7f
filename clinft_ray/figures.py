"""Figures for a paper, the report and MLflow (driver only; matplotlib's Agg backend, no display).

Each figure is built by a function that returns the matplotlib `Figure` (what the tests inspect) and
is written by `save` as PNG (for the page and MLflow) and SVG (vector, for a paper):

- `outcome_bars`: per task, base / SFT / DPO on test for each outcome's metric: the metric's name on the
  axis, the axis bounded by the metric's range, n under each bar, 95% bootstrap CIs as error bars,
  and the paired p-values over brackets stacked above every bar label (like the paper's Figure 2;
  * = significant after the multiple-comparison correction);
- `sweep_curves`: per task and stage, what selection read (the dev metric at every eval step of every
  trial, the selected (trial, step) starred once) beside the eval-loss curves; trials are labelled by
  their hyperparameters, coloured by learning rate and dashed by beta;
- `cost_bars`: device-hours per stage and task (GPU-hours, or CPU-hours on a machine without GPUs),
  stacked by what they paid for, the total written on each bar.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clinft_ray.analysis import HOUR_PARTS, PAIRS, STAGES, part_hours

LABELS = {"base": "base", "sft": "SFT", "dpo": "DPO"}
COLORS = {"base": "#9e9e9e", "sft": "#1f77b4", "dpo": "#d62728"}
METRIC_NAMES = {"f1": "F1", "accuracy": "accuracy", "judge": "judge score (1-5)", "rougeL": "ROUGE-L"}
RANGES = {"judge": (1.0, 5.0)}  # every other metric is in [0, 1]
LINESTYLES = ["-", "--", ":", "-."]
PARTS = dict(zip(HOUR_PARTS, [("", 1.0), ("xx", 0.8), ("//", 0.65), ("..", 0.5)], strict=True))  # hatch, opacity


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> list[Path]:
    """`fig` as `path` (.png, 150 dpi) and beside it as .svg; closes it. Returns both paths."""
    plt = _plt()
    png, svg = path.with_suffix(".png"), path.with_suffix(".svg")
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(svg, bbox_inches="tight")
    plt.close(fig)
    return [png, svg]


def metric_name(metric: str) -> str:
    """`f1` -> "F1", `f1_urgency` -> "F1 (urgency)", `judge` -> "judge score (1-5)"."""
    base, _, part = metric.partition("_")
    name = METRIC_NAMES.get(base, base)
    return f"{name} ({part})" if part else name


def metric_range(metric: str) -> tuple[float, float]:
    return RANGES.get(metric.partition("_")[0], (0.0, 1.0))


def lr_label(lr: float) -> str:
    """1e-05 -> "1e-5", 3e-04 -> "3e-4": how the README and the paper write learning rates."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def trial_label(hparams: dict[str, Any], fallback: str) -> str:
    """A trial by its hyperparameters ("lr 1e-5, beta 0.1"), else its name."""
    parts = [f"lr {lr_label(v)}" if k == "learning_rate" else f"{k} {v:g}" for k, v in sorted(hparams.items())
             if isinstance(v, int | float)]
    parts.sort(key=lambda p: not p.startswith("lr "))  # the learning rate first
    return ", ".join(parts) or fallback


def outcome_bars(task_name: str, task: dict[str, Any], rule: str) -> Any:
    """Grouped bars of each outcome's metric per stage on test with 95% CIs, the p-values of the three
    pairs over brackets; `rule` says what * marks (e.g. "p < 0.05")."""
    import matplotlib.markers as mmarkers
    import matplotlib.transforms as mtransforms
    import numpy as np

    plt = _plt()
    outcomes = list(task["outcomes"].items())
    lo, hi = metric_range(outcomes[0][1])
    n = task.get("n_test")
    fig, ax = plt.subplots(figsize=(max(3.6, 2.4 * len(outcomes)), 4.2))
    width = 0.28
    ticks, tick_labels = [], []
    # Brackets sit in points above the highest bar label of their group, so no bracket crosses a label
    # whatever the axis scale; the axis then grows to hold them (below).
    label_pts, step_pts = 13.0, 13.0
    needs = []  # per group: (its highest label's data top, the points its brackets need above it)
    for i, (outcome, metric) in enumerate(outcomes):
        xs = [i + (k - 1) * width for k in range(3)]
        tops = []
        for x, s in zip(xs, STAGES, strict=True):
            stage = task["stages"][s]
            v = stage["test"][metric]
            ci = (stage.get("test_ci") or {}).get(metric)
            err = None if ci is None else [[max(0.0, v - ci["ci"][0])], [max(0.0, ci["ci"][1] - v)]]
            ax.bar(x, v - lo, width * 0.92, bottom=lo, color=COLORS[s], yerr=err, capsize=3,
                   error_kw={"elinewidth": 0.8, "capthick": 0.8})
            top = v if ci is None else max(v, ci["ci"][1])
            tops.append(top)
            ax.annotate(f"{v:.2f}", (x, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7)
            ticks.append(x)
            tick_labels.append(f"{LABELS[s]}\nn={n}" if n else LABELS[s])
        if len(outcomes) > 1:  # which outcome a group is, under its ticks
            ax.annotate(metric_name(metric), (i, 0), xycoords=("data", "axes fraction"), xytext=(0, -30),
                        textcoords="offset points", ha="center", va="top", fontsize=8)
        base, highest = max(tops), 0.0
        comps = {(c["a"], c["b"]): c for c in task.get("comparisons", []) if c["outcome"] == outcome}
        for level, (a, b) in enumerate(PAIRS):
            if (a, b) not in comps:
                continue
            up = label_pts + level * step_pts
            xa, xb = xs[STAGES.index(a)], xs[STAGES.index(b)]
            # the bracket: a line `up` points above the group's highest label, ticking down at its ends
            ax.plot([xa, xb], [base, base], color="black", lw=0.8, marker=mmarkers.TICKDOWN, ms=4, mew=0.8,
                    transform=mtransforms.offset_copy(ax.transData, fig=fig, y=up, units="points"))
            star = "*" if comps[(a, b)]["significant"] else ""
            ax.annotate(f"p={comps[(a, b)]['p_value']:.2g}{star}", ((xa + xb) / 2, base), xytext=(0, up),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
            highest = up + 10
        needs.append((base, highest))
    ax.set_xticks(ticks, tick_labels, fontsize=8)
    first = outcomes[0][1]  # a task's outcomes share one metric: F1 per triage label set
    ax.set_ylabel(f"{metric_name(first if len(outcomes) == 1 else first.partition('_')[0])} on test")
    ax.set_yticks(np.arange(lo, hi + 0.5) if hi - lo > 1 else np.linspace(lo, hi, 6))  # whole judge scores
    ax.spines[["top", "right"]].set_visible(False)
    ax.spines["left"].set_bounds(lo, hi)  # the axis is the metric's range; above it only annotations
    ax.set_title(f"{task_name}: base vs SFT vs DPO on test\n95% bootstrap CIs; * {rule}", fontsize=9)
    fig.tight_layout()
    # Each group's brackets (points above its highest label) must fit under the axis top, and the
    # metric's range must show whole: solve for the lowest top that does both.
    height_pts = ax.get_window_extent().height * 72 / fig.dpi
    top = max([hi] + [lo + (base - lo) / max(0.2, 1 - (pts + 4) / height_pts) for base, pts in needs])
    ax.set_ylim(lo, top)
    return fig


def sweep_curves(task_name: str, stage: str, metric: str, curves: dict[str, Any], selected: tuple[str, int]) -> Any:
    """Every trial of a stage: its dev `metric` at each eval step (what selection reads, the selected
    point starred) beside its eval loss; colour by learning rate, line style by beta."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    lrs = sorted({c["hparams"].get("learning_rate") for c in curves.values()} - {None}, reverse=True)
    betas = sorted({c["hparams"].get("beta") for c in curves.values()} - {None})
    cmap = plt.get_cmap("viridis")
    colors = {lr: cmap(0.85 * k / max(1, len(lrs) - 1)) for k, lr in enumerate(lrs)}
    fig, (dev_ax, loss_ax) = plt.subplots(1, 2, figsize=(10.0, 3.8), layout="constrained")

    def order(item: tuple[str, Any]) -> tuple:
        hp = item[1]["hparams"]
        return (-hp.get("learning_rate", 0.0), hp.get("beta", 0.0), item[0])

    for trial, c in sorted(curves.items(), key=order):
        hp = c["hparams"]
        style = {"color": colors.get(hp.get("learning_rate"), "black"),
                 "linestyle": LINESTYLES[betas.index(hp["beta"]) % len(LINESTYLES)] if "beta" in hp else "-",
                 "marker": "o", "ms": 3, "lw": 1.4}
        label = trial_label(hp, trial)
        for ax, key in ((dev_ax, "dev"), (loss_ax, "eval_loss")):
            if c[key]:
                steps, values = zip(*c[key], strict=True)
                ax.plot(steps, values, label=label if ax is dev_ax else None, **style)
    chosen = curves.get(selected[0])
    if chosen is not None:
        pick = f"selected: {trial_label(chosen['hparams'], selected[0])}, step {selected[1]}"
        for ax, key in ((dev_ax, "dev"), (loss_ax, "eval_loss")):
            at = [v for st, v in chosen[key] if st == selected[1]]
            if at:
                ax.plot([selected[1]], at, linestyle="none", marker="*", ms=14, color="black", zorder=5,
                        label=pick if ax is dev_ax else None)
    lo, hi = metric_range(metric)
    dev_ax.set_ylim(lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo))
    dev_ax.set_ylabel(f"dev {metric_name(metric)}")
    dev_ax.set_title(f"dev {metric_name(metric)}: what selection reads", fontsize=9)
    loss_ax.set_ylabel("eval loss")
    loss_ax.set_title("eval loss", fontsize=9)
    for ax in (dev_ax, loss_ax):
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.spines[["top", "right"]].set_visible(False)
    handles, labels = dev_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7, frameon=False,
               ncol=1 if len(labels) <= 16 else 2)
    fig.suptitle(f"{task_name}: {LABELS[stage]} sweep, {len(curves)} trial{'s' if len(curves) != 1 else ''}", fontsize=10)
    return fig


def cost_bars(results: dict[str, Any]) -> Any:
    """Device-hours per stage for every task (GPU-hours where any were used, else CPU-hours), each
    bar stacked by what the hours paid for (training, dev scoring, DPO's reference pass, test
    scoring), its total written on it."""
    from matplotlib.patches import Patch

    plt = _plt()
    tasks = list(results["tasks"])
    unit = "gpu_hours" if any(t["gpu_hours"] for t in results["tasks"].values()) else "cpu_hours"
    name = "GPU-hours" if unit == "gpu_hours" else "CPU-hours"
    fig, ax = plt.subplots(figsize=(max(4.2, 2.0 * len(tasks)), 3.8), layout="constrained")
    width = 0.28
    highest = 0.0
    for k, s in enumerate(STAGES):
        xs = [i + (k - 1) * width for i in range(len(tasks))]
        bottom = [0.0] * len(tasks)
        for part, (hatch, opacity) in PARTS.items():
            values = []
            for t in tasks:
                st = results["tasks"][t]["stages"][s]
                h = part_hours(st, part, unit)
                values.append(h if h is not None else st[unit] if part == "train" else 0.0)  # results without the split
            ax.bar(xs, values, width * 0.92, bottom=bottom, color=COLORS[s], alpha=opacity, hatch=hatch)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for x, total in zip(xs, bottom, strict=True):
            ax.annotate(_hours(total), (x, total), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7)
            highest = max(highest, total)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, highest * 1.15 if highest > 0 else 1.0)
    ax.set_ylabel(f"device time ({name})")
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(f"cost per stage, in {name}", fontsize=10)
    # one legend for the stages (colour) and one for what the hours paid for (hatch, on grey)
    stages = [Patch(color=COLORS[s], label=LABELS[s]) for s in STAGES]
    parts = [Patch(facecolor="#bdbdbd", alpha=opacity, hatch=hatch, label=part.replace("_", " "))
             for part, (hatch, opacity) in PARTS.items()]
    fig.legend(handles=stages + parts, loc="outside right center", fontsize=7, frameon=False)
    return fig


def _hours(h: float) -> str:
    """Hours to three significant figures, without scientific notation down to 0.0001."""
    if h == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(h)))))
    return f"{h:.{digits}f}"
