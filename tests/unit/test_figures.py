"""The figures, checked structurally on hand-written results: axis labels and ranges, n and the CIs on
the test bars, brackets that cross no label, every trial in the sweep legend with one selected point,
colour by learning rate and line style by beta, values on the cost bars, no text box over another
(matplotlib's own bounding boxes), and each figure written as PNG and SVG."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.lines import Line2D
from matplotlib.text import Text

from clinft_ray.figures import cost_bars, outcome_bars, save, sweep_curves

PAIRS = (("base", "sft"), ("sft", "dpo"), ("base", "dpo"))


def task(outcomes: dict[str, str], values: dict[str, float], n: int = 200) -> dict:
    stages = {}
    for s, v in values.items():
        stages[s] = {"test": {m: v for m in outcomes.values()},
                     "test_ci": {m: {"value": v, "ci": [max(0.0, v - 0.05), v + 0.02]} for m in outcomes.values()},
                     "gpu_hours": 0.0, "cpu_hours": {"base": 0.004, "sft": 0.0144, "dpo": 0.0317}[s],
                     "hours_by": {"test_eval": {"cpu_hours": 0.004}, **({} if s == "base" else {"train": {"cpu_hours": 0.01}})}}
    comps = [{"outcome": o, "a": a, "b": b, "p_value": 10 ** -(3 * k + 1), "significant": k != 1}
             for o in outcomes for k, (a, b) in enumerate(PAIRS)]
    return {"metric": next(iter(outcomes.values())), "n_test": n, "outcomes": outcomes, "stages": stages,
            "comparisons": comps, "gpu_hours": 0.0}


def texts(fig) -> list[Text]:
    """Every piece of text the figure draws: titles, axis labels, annotations, the tick labels of ticks
    in view, legend entries."""
    fig.canvas.draw()
    found = [*fig.texts, *(t for legend in fig.legends for t in legend.get_texts())]
    for ax in fig.axes:
        found += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            found += [tick.label1 for tick in axis.get_major_ticks() if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9]
    return [t for t in found if t.get_visible() and t.get_text().strip()]


def assert_no_text_overlaps(fig) -> None:
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer).shrunk(0.98, 0.98)) for t in texts(fig)]
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"


def brackets(ax) -> list[Line2D]:
    return [line for line in ax.lines if line.get_marker() == 3]  # TICKDOWN: a bracket's ends


@pytest.mark.parametrize("outcomes,values,name,bounds", [
    ({"correct": "f1"}, {"base": 0.02, "sft": 0.99, "dpo": 1.0}, "F1 on test", (0.0, 1.0)),
    ({"correct_urgency": "f1_urgency", "correct_responder": "f1_responder"},
     {"base": 0.5, "sft": 0.97, "dpo": 0.98}, "F1 on test", (0.0, 1.0)),
    ({"score": "judge"}, {"base": 1.4, "sft": 3.9, "dpo": 4.6}, "judge score (1-5) on test", (1.0, 5.0)),
])
def test_test_bars_name_the_metric_show_n_and_cis_and_no_bracket_crosses_a_label(outcomes, values, name, bounds):
    fig = outcome_bars("uti", task(outcomes, values), "p < 0.05")
    [ax] = fig.axes
    assert ax.get_ylabel() == name
    ticks = ax.get_yticks()
    assert min(ticks) == pytest.approx(bounds[0]) and max(ticks) == pytest.approx(bounds[1])
    assert ax.spines["left"].get_bounds() == pytest.approx(bounds)  # the axis drawn is the metric's range
    assert ax.get_ylim()[0] == pytest.approx(bounds[0])
    assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 3 * len(outcomes)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["base\nn=200", "SFT\nn=200", "DPO\nn=200"] * len(outcomes)
    shown = [t.get_text() for t in texts(fig)]
    assert "p=0.1*" in shown and "p=0.0001" in shown and "p=1e-07*" in shown  # * only where significant
    assert sum(s.startswith("p=") for s in shown) == 3 * len(outcomes)
    assert_no_text_overlaps(fig)
    renderer = fig.canvas.get_renderer()
    value_labels = [t for t in ax.texts if t.get_text().replace(".", "").isdigit()]
    assert len(value_labels) == 3 * len(outcomes)
    axes_box = ax.get_window_extent(renderer)
    for line in brackets(ax):
        box = line.get_window_extent(renderer)
        assert box.y1 <= axes_box.y1 + 1  # inside the axes: the axis grew to hold it
        for label in value_labels:
            assert not box.overlaps(label.get_window_extent(renderer)), f"a bracket crosses {label.get_text()}"
    assert len(brackets(ax)) == 3 * len(outcomes)
    assert ax.get_legend() is None and not fig.legends  # the stages are named under their bars


def sweep(lrs=(1e-2, 1e-3, 1e-4, 1e-5), betas=(0.1, 0.3, 0.5)) -> dict:
    curves = {}
    for i, (lr, beta) in enumerate(itertools.product(lrs, betas)):
        curves[f"uti-dpo-beta{beta:g}-lr{lr:.0e}-{i:05d}"] = {
            "hparams": {"learning_rate": lr, "beta": beta},
            "dev": [[10, 0.5 + 0.03 * i], [20, 0.4 + 0.04 * i]], "eval_loss": [[10, 0.7 - 0.02 * i], [20, 0.6 - 0.03 * i]]}
    return curves


def test_sweep_curves_show_dev_beside_loss_every_trial_by_its_hyperparameters_and_the_selection_once():
    curves = sweep()
    selected = ("uti-dpo-beta0.3-lr1e-03-00004", 10)
    fig = sweep_curves("uti", "dpo", "f1", curves, selected)
    dev_ax, loss_ax = fig.axes
    assert dev_ax.get_ylabel() == "dev F1" and loss_ax.get_ylabel() == "eval loss"
    assert dev_ax.get_xlabel() == loss_ax.get_xlabel() == "optimizer step"
    [legend] = fig.legends
    entries = [t.get_text() for t in legend.get_texts()]
    assert len(entries) == 13 and entries[-1] == "selected: lr 1e-3, beta 0.3, step 10"
    assert entries[0] == "lr 1e-2, beta 0.1" and "lr 1e-5, beta 0.5" in entries
    for ax, key in ((dev_ax, "dev"), (loss_ax, "eval_loss")):
        stars = [line for line in ax.lines if line.get_marker() == "*"]
        assert len(stars) == 1  # marked once per panel
        assert list(stars[0].get_xydata()[0]) == pytest.approx(curves[selected[0]][key][0])
        trials = [line for line in ax.lines if line.get_marker() == "o"]
        assert len(trials) == 12
        styles = {(tuple(line.get_color()), line.get_linestyle()) for line in trials}
        assert len(styles) == 12  # every trial distinguishable
        assert len({tuple(line.get_color()) for line in trials}) == 4  # one colour per learning rate
        assert len({line.get_linestyle() for line in trials}) == 3  # one line style per beta
    assert dev_ax.get_ylim()[0] < 0 < 1 < dev_ax.get_ylim()[1] < 1.1  # the metric's range, a margin around it
    assert_no_text_overlaps(fig)


def test_sft_sweep_labels_trials_by_learning_rate_alone():
    curves = {f"uti-sft-lr{lr:.0e}-{i:05d}": {"hparams": {"learning_rate": lr}, "dev": [[20, 0.5]], "eval_loss": [[20, 1.0]]}
              for i, lr in enumerate((1e-5, 1e-6, 1e-7, 1e-8))}
    fig = sweep_curves("uti", "sft", "accuracy", curves, ("uti-sft-lr1e-06-00001", 20))
    entries = [t.get_text() for t in fig.legends[0].get_texts()]
    assert entries == ["lr 1e-5", "lr 1e-6", "lr 1e-7", "lr 1e-8", "selected: lr 1e-6, step 20"]
    assert fig.axes[0].get_ylabel() == "dev accuracy"


def test_cost_bars_carry_their_values_and_name_the_unit(tmp_path):
    results = {"tasks": {"uti": task({"correct": "f1"}, {"base": 0.02, "sft": 0.99, "dpo": 1.0}),
                         "tri": task({"correct_urgency": "f1_urgency"}, {"base": 0.5, "sft": 0.9, "dpo": 0.95})}}
    fig = cost_bars(results)
    [ax] = fig.axes
    assert ax.get_ylabel() == "device time (CPU-hours)"
    shown = [t.get_text() for t in texts(fig)]
    assert shown.count("0.0140") == 4 and shown.count("0.00400") == 2  # train 0.01 + test 0.004; base: test only
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["base", "SFT", "DPO", "train", "dev eval", "reference", "test eval"]
    assert_no_text_overlaps(fig)
    png, svg = save(fig, tmp_path / "cost.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ET.parse(svg).getroot().tag.endswith("svg")  # vector, for a paper
