"""The study's statistics from outcome rows alone (what `clinft report` redoes): m and the footnote,
Holm's families, bootstrap F1 against scikit-learn, clinical metrics, costs at new prices, no NaN; the
paired test each kind of outcome gets, and the DPO/SFT cost ratios against hand-worked values."""

from __future__ import annotations

import json

import pytest
from sklearn.metrics import f1_score

from clinft_ray.analysis import compare, study_statistics, task_costs
from clinft_ray.config import ReasoningTask, StudyConfig, SummarizationTask, TriageTask
from clinft_ray.outputs import dotted_diff, report_config, stored_config

GOLD = ["UTI"] * 5 + ["pyuria"] * 5
PRED = {"base": ["UTI", "pyuria", "pyuria", "<none>", "UTI", "UTI", "pyuria", "UTI", "pyuria", "UTI"],
        "sft": ["UTI", "UTI", "UTI", "UTI", "pyuria", "pyuria", "pyuria", "pyuria", "pyuria", "UTI"],
        "dpo": ["UTI", "UTI", "UTI", "UTI", "UTI", "pyuria", "pyuria", "pyuria", "pyuria", "pyuria"]}
URG = ["urgent", "non-urgent"] * 5


def config(**stats) -> StudyConfig:
    return StudyConfig.model_validate({
        "study": "s", "output_dir": "/tmp/s", "model": {"name_or_path": "m"}, "sft": {"space": "a"},
        "dpo": {"space": "b"}, "stats": {"bootstrap_resamples": 500, **stats}, "cost": {"cpu_hour_usd": 2.0},
        "tasks": [{"name": "uti", "kind": "classification", "labels": ["UTI", "pyuria"], "positive_label": "UTI",
                   "splits": {s: f"{s}.jsonl" for s in ("train", "eval", "dev", "test")}},
                  {"name": "tri", "kind": "triage", "splits": {s: f"{s}.jsonl" for s in ("train", "eval", "dev", "test")}}]})


def rows() -> list[dict]:
    out = []
    for s, pred in PRED.items():
        for i, (g, p) in enumerate(zip(GOLD, pred, strict=True)):
            out.append({"task": "uti", "stage": s, "id": str(i), "correct": g == p, "gold": g, "pred": p})
            pu = URG[i] if s != "base" or i % 2 else "non-urgent"
            out.append({"task": "tri", "stage": s, "id": str(i), "correct_urgency": pu == URG[i],
                        "correct_responder": i % 3 != 0, "gold_urgency": URG[i], "pred_urgency": pu})
    return out


def results() -> dict:
    stage = {"test": {}, "gpu_hours": 0.0, "cpu_hours": 1.5, "cost_usd": 0.0, "trials": 1}
    tasks = {"uti": {"outcomes": {"correct": "f1"}, "stages": {s: dict(stage, test={}) for s in PRED}},
             "tri": {"outcomes": {"correct_urgency": "f1_urgency", "correct_responder": "f1_responder"},
                     "stages": {s: dict(stage, test={}) for s in PRED}}}
    return {"tasks": tasks}


def test_bonferroni_m_counts_outcomes_and_the_footnote_says_so():
    """3 outcomes (uti f1, tri f1_urgency, tri f1_responder); pairs not counted: 0.05 / 3 = 0.0167."""
    r = study_statistics(config(), results(), rows())
    assert r["comparisons_m"] == 3 and r["threshold"] == pytest.approx(0.05 / 3)
    note = r["multiple_comparisons"]["footnote"]
    assert "0.05 / 3 = 0.0167" in note and "not counted" in note and "each of the 9 tests" in note
    comps = r["tasks"]["uti"]["comparisons"] + r["tasks"]["tri"]["comparisons"]
    assert len(comps) == 9
    assert all(c["significant"] == (c["p_value"] < 0.05 / 3) for c in comps)
    assert all(c["p_adjusted"] == pytest.approx(min(1.0, 3 * c["p_value"])) for c in comps)
    counted = study_statistics(config(count_pairs=True), results(), rows())
    assert counted["comparisons_m"] == 9 and "9 = 3 outcomes x 3 pairs" in counted["multiple_comparisons"]["footnote"]
    json.dumps(r, allow_nan=False)  # no NaN or inf anywhere, identical triage outcomes included


def test_holm_runs_per_pair_over_the_outcomes():
    r = study_statistics(config(correction="holm", alpha=0.1), results(), rows())
    assert r["threshold"] is None and r["correction"] == "holm"
    assert "each pair separately, over the m = 3 outcomes" in r["multiple_comparisons"]["footnote"]
    from statsmodels.stats.multitest import multipletests

    comps = r["tasks"]["uti"]["comparisons"] + r["tasks"]["tri"]["comparisons"]
    for pair in (("base", "sft"), ("sft", "dpo"), ("base", "dpo")):
        family = [c for c in comps if (c["a"], c["b"]) == pair]
        assert len(family) == 3
        assert [c["p_adjusted"] for c in family] == pytest.approx(
            list(multipletests([c["p_value"] for c in family], alpha=0.1, method="holm")[1]))


def test_bootstrap_f1_difference_is_the_sklearn_difference_and_clinical_metrics_follow_the_labels():
    r = study_statistics(config(), results(), rows())
    base_sft = r["tasks"]["uti"]["comparisons"][0]
    f1 = {s: f1_score(GOLD, p, labels=["UTI"], average="macro", zero_division=0) for s, p in PRED.items()}
    boot = base_sft["bootstrap"]["f1"]
    assert boot["diff"] == pytest.approx(f1["base"] - f1["sft"])
    assert boot["ci"][0] <= boot["diff"] <= boot["ci"][1] and boot["n_resamples"] == 500
    assert set(base_sft["bootstrap"]) == {"f1", "accuracy"}
    assert set(r["tasks"]["tri"]["comparisons"][0]["bootstrap"]) == {"f1_urgency", "accuracy_urgency"}
    # responder has no stored labels: accuracy only, and no clinical metrics
    assert set(r["tasks"]["tri"]["comparisons"][3]["bootstrap"]) == {"accuracy_responder"}
    assert set(r["tasks"]["tri"]["clinical"]["sft"]) == {"correct_urgency"}
    # DPO on uti: gold UTI x5 all right, pyuria x5 all right -> sensitivity 5/5, specificity 5/5
    dpo = r["tasks"]["uti"]["clinical"]["dpo"]["correct"]["per_label"]["UTI"]
    assert dpo["sensitivity"]["value"] == 1.0 and dpo["specificity"]["value"] == 1.0
    # base: TP 2 (0, 4), FN 3 (1, 2, and 3 unparseable), FP 3 (5, 7, 9), TN 2 -> sensitivity 2/5, PPV 2/5
    base = r["tasks"]["uti"]["clinical"]["base"]["correct"]["per_label"]["UTI"]
    assert (base["tp"], base["fn"], base["fp"], base["tn"]) == (2, 3, 3, 2)
    assert r["tasks"]["uti"]["clinical"]["base"]["correct"]["confusion"]["counts"] == [[2, 2, 1], [3, 2, 0]]


def test_each_stage_has_a_95_ci_of_its_test_metric_around_the_sklearn_value():
    """The test figure's error bars: per stage and outcome, a bootstrap CI around the metric itself
    (F1 as scikit-learn computes it; accuracy where no labels are stored), or None for an F1 without labels."""
    r = study_statistics(config(), results(), rows())
    for s, pred in PRED.items():
        ci = r["tasks"]["uti"]["stages"][s]["test_ci"]["f1"]
        assert ci["value"] == pytest.approx(f1_score(GOLD, pred, labels=["UTI"], average="macro", zero_division=0))
        assert ci["ci"][0] <= ci["value"] <= ci["ci"][1] and ci["n_resamples"] == 500
    dpo = r["tasks"]["uti"]["stages"]["dpo"]["test_ci"]["f1"]
    assert dpo["value"] == 1.0 and dpo["ci"] == [1.0, 1.0]  # every resample of a perfect stage is perfect
    tri = r["tasks"]["tri"]["stages"]["base"]["test_ci"]
    assert tri["f1_responder"] is None  # responder's labels were not stored: no F1 to resample
    assert tri["f1_urgency"]["value"] == 0.0 and tri["f1_urgency"]["ci"] == [0.0, 0.0]  # base never says urgent
    base = r["tasks"]["uti"]["stages"]["base"]["test_ci"]["f1"]
    assert base["value"] == pytest.approx(0.4) and base["ci"][0] < 0.4 < base["ci"][1]  # 10 examples: a wide interval


def test_costs_follow_the_prices():
    """1.5 CPU-hours per stage at $2 = $3 per stage, $9 per task, $18 in all."""
    r = study_statistics(config(), results(), rows())
    assert r["tasks"]["uti"]["stages"]["dpo"]["cost_usd"] == pytest.approx(3.0)
    assert r["tasks"]["uti"]["cost_usd"] == pytest.approx(9.0) and r["totals"]["cost_usd"] == pytest.approx(18.0)
    assert r["tasks"]["uti"]["dpo_sft_cost_ratio"] == pytest.approx(1.0)


def test_report_config_takes_stats_and_prices_and_names_what_else_would_change():
    from clinft_ray.config import ConfigError

    stored = stored_config(config())
    cfg = report_config(stored, ["stats.alpha=0.01", "cost.gpu_hour_usd=3.1"], "results.json")
    assert cfg.stats.alpha == 0.01 and cfg.cost.gpu_hour_usd == 3.1
    assert dotted_diff(stored, stored_config(cfg)) == ["cost.gpu_hour_usd", "stats.alpha"]
    with pytest.raises(ConfigError, match=r"seed, tasks\.0\.labels\.1: would change what was trained"):
        report_config(stored, ["seed=3", "tasks.0.labels=[UTI, other]", "tasks.0.positive_label=UTI"], "r")
    with pytest.raises(ConfigError, match="stats.bootstrap_resamples"):
        report_config(stored, ["stats.bootstrap_resamples=5"], "r")
    with pytest.raises(ConfigError, match="stats.correctoin: unknown key; did you mean 'correction'"):
        report_config(stored, ["stats.correctoin=holm"], "r")


def test_task_costs_ratio_from_gpu_hours_else_cpu_hours():
    """SFT 2 GPU-h, DPO 5 GPU-h: ratio 5 / 2 = 2.5 on GPU-hours; with no GPU, CPU-hours 4 and 10: 2.5."""
    def stage(g, c):
        return {"gpu_hours": g, "cpu_hours": c, "cost_usd": 0.0}

    gpu = task_costs({"base": stage(0.1, 0.4), "sft": stage(2.0, 8.0), "dpo": stage(5.0, 20.0)})
    assert gpu["dpo_sft_cost_ratio"] == pytest.approx(2.5) and gpu["cost_basis"] == "gpu_hours"
    assert gpu["gpu_hours"] == pytest.approx(7.1)
    cpu = task_costs({"base": stage(0, 1.0), "sft": stage(0, 4.0), "dpo": stage(0, 10.0)})
    assert cpu["dpo_sft_cost_ratio"] == pytest.approx(2.5) and cpu["cost_basis"] == "cpu_hours"


def test_stage_hours_split_by_what_they_paid_for_and_the_two_ratios():
    """SFT: training 2 GPU-h + dev scoring 0.5 + test scoring 0.5 = 3; DPO: training 5 + dev 1.5 +
    reference 1 + test 0.5 = 8. Everything: 8 / 3 = 2.667; training alone: 5 / 2 = 2.5. At $3 per
    GPU-hour DPO costs 8 x 3 = $24."""
    from clinft_ray.study import hours_split

    def h(g):
        return {"gpu_hours": g, "cpu_hours": 4 * g, "cost_usd": 3 * g}

    sft = hours_split({"train": h(2.0), "dev_eval": h(0.5), "reference": {}, "test_eval": h(0.5)})
    dpo = hours_split({"train": h(5.0), "dev_eval": h(1.5), "reference": h(1.0), "test_eval": h(0.5)})
    assert set(sft["hours_by"]) == {"train", "dev_eval", "test_eval"}  # SFT has no reference pass
    assert dpo["gpu_hours"] == pytest.approx(8.0) and dpo["cpu_hours"] == pytest.approx(32.0)
    assert dpo["cost_usd"] == pytest.approx(24.0)
    costs = task_costs({"base": hours_split({"test_eval": h(0.5)}), "sft": sft, "dpo": dpo})
    assert costs["dpo_sft_cost_ratio"] == pytest.approx(8 / 3)
    assert costs["dpo_sft_train_cost_ratio"] == pytest.approx(2.5)
    assert costs["gpu_hours"] == pytest.approx(0.5 + 3.0 + 8.0)


SPLITS = {s: f"{s}.jsonl" for s in ("train", "eval", "dev", "test")}
TRIAGE = TriageTask(name="t", kind="triage", splits=SPLITS)


def test_outcomes_per_kind_and_their_tests():
    assert TRIAGE.outcome_metrics == {"correct_urgency": "f1_urgency", "correct_responder": "f1_responder"}
    summ = SummarizationTask(name="s", kind="summarization", splits=SPLITS)
    scores = {"base": [3.0, 4.0, 2.0], "sft": [4.0, 4.0, 3.0], "dpo": [5.0, 4.0, 4.0]}
    comps = compare(summ, summ.outcome_metrics, {s: {"score": v} for s, v in scores.items()}, 1000, 0)
    assert [c["test"] for c in comps] == ["paired_t"] * 3
    # base vs sft: differences -1, 0, -1: mean -2/3, sd 1/sqrt(3), t = (-2/3) / ((1/sqrt(3))/sqrt(3)) = -2
    assert comps[0]["statistic"] == pytest.approx(-2.0)
    binary = {s: {"correct": [s != "base", True]} for s in ("base", "sft", "dpo")}
    reasoning = ReasoningTask(name="r", kind="reasoning", splits=SPLITS)
    assert {c["test"] for c in compare(reasoning, {"correct": "accuracy"}, binary, 1000, 0)} == {"mcnemar_exact"}
