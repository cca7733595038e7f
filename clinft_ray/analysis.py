"""The statistics and costs of `results.json`, from per-example test outcomes (driver only, no model).

`study_statistics(cfg, results, rows)` fills in, from the rows of `outcomes.jsonl` alone, everything
in `results.json` that depends on the `stats:` and `cost:` settings, so `clinft report` can rebuild it
in seconds with other settings and the study computes it the same way:

- per task, outcome and pair (base-SFT, SFT-DPO, base-DPO): the paired test (McNemar on correctness,
  the paired t-test on scores) with its effect sizes, the paired bootstrap CI of the difference of
  each metric (F1 and accuracy, or the judge mean), the p-value adjusted for multiple comparisons
  and whether it is significant;
- per task and stage, the 95% bootstrap CI of each outcome's metric on test (`test_ci`: the test
  figure's error bars);
- per task and stage, for label outcomes (classification, triage), the confusion matrix and the
  sensitivity, specificity, PPV and NPV with Wilson CIs;
- the cost of every stage and task at the configured prices.

Multiple comparisons. m counts the outcomes compared (one per classification or reasoning task, one
per label set of a triage task, one per summarization task: the paper's 5). The three pairs of an
outcome are not counted in m by default, as in the paper: with Bonferroni each of the 3 m tests is
held to alpha / m. `stats.count_pairs: true` counts them (m = 3 x outcomes); `stats.comparisons`
sets m by hand. Holm's step-down runs per pair over the m outcomes (or over all 3 m tests with
`count_pairs`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clinft_ray.config import ClassificationTask, StudyConfig, TriageTask
from clinft_ray.stats import (
    CONFIDENCE,
    adjust,
    bootstrap_ci,
    clinical_metrics,
    f1_codes,
    mcnemar,
    paired_bootstrap,
    paired_t,
)
from clinft_ray.tasks import NO_LABEL

STAGES = ("base", "sft", "dpo")
PAIRS = (("base", "sft"), ("sft", "dpo"), ("base", "dpo"))
NAMES = {"base": "base", "sft": "SFT", "dpo": "DPO"}


def label_sets(task: Any) -> dict[str, tuple[list[str], str | None]]:
    """Outcome -> (labels, positive label) for the outcomes that have predicted labels."""
    if isinstance(task, ClassificationTask):
        return {"correct": (task.labels, task.positive_label)}
    if isinstance(task, TriageTask):
        return {f"correct_{n}": (ls.labels, ls.positive_label) for n, ls in task.label_sets.items()}
    return {}


def label_fields(outcome: str) -> tuple[str, str]:
    """The `outcomes.jsonl` fields with an outcome's gold and predicted labels: `correct` -> (`gold`,
    `pred`), `correct_urgency` -> (`gold_urgency`, `pred_urgency`); a prediction is None where the
    answer gave no label."""
    suffix = outcome[len("correct"):]
    return f"gold{suffix}", f"pred{suffix}"


def columns(rows: list[dict[str, Any]], task: str) -> dict[str, dict[str, list[Any]]]:
    """stage -> field -> values, every stage in the order of the base stage's example ids."""
    by_stage: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in STAGES}
    for r in rows:
        if r["task"] == task:
            by_stage[r["stage"]][r["id"]] = r
    ids = list(by_stage["base"])
    for s in STAGES:
        if sorted(by_stage[s]) != sorted(ids):
            raise ValueError(f"outcomes of task {task!r}: stage {s} was scored on other test examples than base; "
                             "outcomes cannot be paired (rerun the study)")
    keys = {k for r in by_stage["base"].values() for k in r} - {"task", "stage", "id"}
    return {s: {k: [by_stage[s][i].get(k) for i in ids] for k in keys} for s in STAGES}


def _codes(values: list[Any], labels: list[str]) -> np.ndarray:
    index = {lab: k for k, lab in enumerate(labels)}
    return np.array([index.get(v, -1) for v in values])


def label_codes(task: Any, outcome: str, cols: dict[str, dict[str, list[Any]]], stages: tuple[str, ...]
                ) -> tuple[tuple[np.ndarray, ...], list[int]] | None:
    """An outcome's stored labels as integer codes for the F1 bootstraps: (gold, then each stage's
    predictions) and the codes F1 averages over (the positive label, else every label); None where the
    labels were not stored."""
    sets = label_sets(task)
    gold_key, pred_key = label_fields(outcome)
    if outcome not in sets or any(gold_key not in cols[s] or pred_key not in cols[s] for s in stages):
        return None
    labels, positive = sets[outcome]
    pos = [labels.index(positive)] if positive is not None else list(range(len(labels)))
    return (_codes(cols[stages[0]][gold_key], labels), *(_codes(cols[s][pred_key], labels) for s in stages)), pos


def bootstraps(task: Any, outcome: str, metric: str, cols: dict[str, dict[str, list[Any]]], a: str, b: str,
               n_resamples: int, seed: int) -> dict[str, Any]:
    """metric -> paired bootstrap of metric(A) - metric(B): F1 (when the labels are stored) and
    accuracy for a label outcome, accuracy for reasoning, the judge mean for scores."""
    xa, xb = cols[a][outcome], cols[b][outcome]
    if not all(isinstance(x, bool) for x in xa + xb):
        return {metric: paired_bootstrap(lambda u, v, axis: np.mean(u, axis=axis) - np.mean(v, axis=axis),
                                         (np.array(xa, float), np.array(xb, float)), n_resamples, seed)}
    suffix = outcome[len("correct"):]
    out = {f"accuracy{suffix}": paired_bootstrap(lambda u, v, axis: np.mean(u, axis=axis) - np.mean(v, axis=axis),
                                                 (np.array(xa, float), np.array(xb, float)), n_resamples, seed)}
    coded = label_codes(task, outcome, cols, (a, b))
    if coded is not None:
        data, pos = coded
        out[f"f1{suffix}"] = paired_bootstrap(
            lambda g, u, v, axis: f1_codes(g, u, pos, axis) - f1_codes(g, v, pos, axis), data, n_resamples, seed)
    return out


def stage_interval(task: Any, outcome: str, metric: str, cols: dict[str, dict[str, list[Any]]], stage: str,
                   n_resamples: int, seed: int) -> dict[str, Any] | None:
    """The 95% bootstrap CI of one stage's test `metric` for `outcome` (the test figure's error bars):
    F1 from the stored gold and predicted labels, accuracy and the judge's mean from the per-example
    outcome; None for an F1 whose labels were not stored."""
    if not metric.startswith("f1"):
        return bootstrap_ci(lambda u, axis: np.mean(u, axis=axis), (np.array(cols[stage][outcome], float),),
                            n_resamples, seed)
    coded = label_codes(task, outcome, cols, (stage,))
    if coded is None:
        return None
    data, pos = coded
    return bootstrap_ci(lambda g, u, axis: f1_codes(g, u, pos, axis), data, n_resamples, seed)


def compare(task: Any, outcome_metrics: dict[str, str], cols: dict[str, dict[str, list[Any]]], n_resamples: int,
            seed: int) -> list[dict[str, Any]]:
    """Per outcome and pair: the paired test with its effects and the bootstrap CIs (not yet adjusted)."""
    out = []
    for outcome, metric in outcome_metrics.items():
        for a, b in PAIRS:
            xa, xb = cols[a][outcome], cols[b][outcome]
            res = mcnemar(xa, xb) if all(isinstance(x, bool) for x in xa + xb) else paired_t(xa, xb)
            out.append({"outcome": outcome, "metric": metric, "a": a, "b": b, "test": res.test,
                        "statistic": res.statistic, "p_value": res.p_value, **res.effect,
                        "bootstrap": bootstraps(task, outcome, metric, cols, a, b, n_resamples, seed)})
    return out


def clinical(task: Any, cols: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, Any]]:
    """stage -> outcome -> confusion matrix and clinical metrics, for outcomes whose labels are stored."""
    out: dict[str, dict[str, Any]] = {}
    for outcome, (labels, positive) in label_sets(task).items():
        gold_key, pred_key = label_fields(outcome)
        for s in STAGES:
            if gold_key in cols[s] and pred_key in cols[s]:
                pred = [NO_LABEL if p is None else p for p in cols[s][pred_key]]
                out.setdefault(s, {})[outcome] = clinical_metrics(labels, positive, cols[s][gold_key], pred, NO_LABEL)
    return out


def correction(cfg: StudyConfig, n_outcomes: int, outcome_names: list[str]) -> dict[str, Any]:
    """What m is, the threshold, and the footnote that says what was divided by what."""
    st = cfg.stats
    pairs = "the 3 pairs per outcome (base-SFT, SFT-DPO, base-DPO)"
    if st.comparisons is not None:
        m, why = st.comparisons, f"m = {st.comparisons} (set by stats.comparisons)"
    elif st.count_pairs:
        m, why = 3 * n_outcomes, f"m = {3 * n_outcomes} = {n_outcomes} outcomes x 3 pairs ({', '.join(outcome_names)})"
    else:
        m, why = n_outcomes, (f"m = {n_outcomes} outcomes compared ({', '.join(outcome_names)}); {pairs} are not "
                              f"counted in m, as in the paper, so each of the {3 * n_outcomes} tests is held to it")
    if st.correction == "bonferroni":
        threshold = st.alpha / m
        note = f"Bonferroni: * marks p < alpha / m = {st.alpha:g} / {m} = {threshold:.3g}, {why}."
    else:
        threshold = None
        family = (f"all {3 * n_outcomes} tests as one family" if st.count_pairs else
                  f"each pair separately, over the m = {n_outcomes} outcomes ({', '.join(outcome_names)})")
        note = f"Holm's step-down over {family}: * marks a Holm-adjusted p < alpha = {st.alpha:g}."
    return {"method": st.correction, "m": m, "pairs_counted": st.count_pairs, "threshold": threshold, "footnote": note}


def study_statistics(cfg: StudyConfig, results: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fill in `results` (in place, and returned) from the outcome rows: comparisons, clinical
    metrics, multiple-comparison correction and costs at `cfg`'s settings."""
    tasks = {t.name: t for t in cfg.tasks}
    outcome_names = [f"{name} {metric}" for name, t in results["tasks"].items() for metric in t["outcomes"].values()]
    mc = correction(cfg, len(outcome_names), outcome_names)
    everything = []
    for name, t in results["tasks"].items():
        cols = columns(rows, name)
        t["comparisons"] = compare(tasks[name], t["outcomes"], cols, cfg.stats.bootstrap_resamples, cfg.stats.seed)
        t["clinical"] = clinical(tasks[name], cols)
        for stage in STAGES:
            t["stages"][stage]["test_ci"] = {
                metric: stage_interval(tasks[name], outcome, metric, cols, stage, cfg.stats.bootstrap_resamples,
                                       cfg.stats.seed) for outcome, metric in t["outcomes"].items()}
        everything += t["comparisons"]
    families: dict[Any, list[dict[str, Any]]] = {}
    for c in everything:
        key = "all" if cfg.stats.correction == "bonferroni" or cfg.stats.count_pairs else (c["a"], c["b"])
        families.setdefault(key, []).append(c)
    for family in families.values():
        for c, (q, sig) in zip(family, adjust([c["p_value"] for c in family], cfg.stats.alpha,
                                              cfg.stats.correction, mc["m"]), strict=True):
            c["p_adjusted"], c["significant"] = q, sig
    results.update({"alpha": cfg.stats.alpha, "correction": cfg.stats.correction, "comparisons_m": mc["m"],
                    "threshold": mc["threshold"], "multiple_comparisons": mc,
                    "bootstrap": {"n_resamples": cfg.stats.bootstrap_resamples, "seed": cfg.stats.seed,
                                  "confidence": CONFIDENCE, "resampled": "test examples, jointly across stages"}})
    reprice(cfg, results)
    return results


def reprice(cfg: StudyConfig, results: dict[str, Any]) -> None:
    """Every stage's `cost_usd` from its device-hours at `cfg.cost`'s prices, then the task and study sums."""
    def price(h: dict[str, float]) -> float:
        return h.get("gpu_hours", 0.0) * cfg.cost.gpu_hour_usd + h.get("cpu_hours", 0.0) * cfg.cost.cpu_hour_usd

    for t in results["tasks"].values():
        for st in t["stages"].values():
            st["cost_usd"] = price(st)
            for part in st.get("hours_by", {}).values():
                part["cost_usd"] = price(part)
        t.update(task_costs(t["stages"]))
    results["totals"] = {k: sum(t[k] for t in results["tasks"].values()) for k in ("gpu_hours", "cpu_hours", "cost_usd")}


HOUR_PARTS = ("train", "dev_eval", "reference", "test_eval")  # what a stage's device-hours paid for (study.hours_split)


def part_hours(stage: dict[str, Any], part: str, unit: str) -> float | None:
    """A stage's `unit` hours spent on `part`; None for results written without the split. Results of
    clinft-ray before the train/dev_eval split kept both as `trials`, read here as `train`."""
    by = stage.get("hours_by")
    if not by:
        return None
    if part == "train" and "train" not in by and "dev_eval" not in by:
        part = "trials"
    return by.get(part, {}).get(unit, 0.0)


def task_costs(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Device-hours per stage and in all, and DPO's cost over SFT's (GPU-hours, or CPU-hours without
    GPUs): `dpo_sft_cost_ratio` for everything each stage ran (training, dev scoring, reference pass,
    test scoring), `dpo_sft_train_cost_ratio` for training alone (None for results without the split)."""
    costs: dict[str, Any] = {}
    for unit in ("gpu_hours", "cpu_hours", "cost_usd"):
        costs[unit] = sum(s[unit] for s in stages.values())
        for name in ("sft", "dpo"):
            costs[f"{name}_{unit}"] = stages[name][unit]
    basis = "gpu_hours" if costs["sft_gpu_hours"] else "cpu_hours"
    sft_cost = costs[f"sft_{basis}"]
    costs["dpo_sft_cost_ratio"] = costs[f"dpo_{basis}"] / sft_cost if sft_cost else None
    train = [part_hours(stages[n], "train", basis) for n in ("sft", "dpo")]
    costs["dpo_sft_train_cost_ratio"] = train[1] / train[0] if train[0] and train[1] is not None else None
    costs["cost_basis"] = basis
    return costs
