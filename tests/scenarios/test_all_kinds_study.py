"""All four task kinds through the whole study on small grids: F1 per triage label set, accuracy for
reasoning, the judge's score (and ROUGE-L) for summaries, and the right paired test per outcome."""

from __future__ import annotations

import json

import pytest
import yaml

from clinft_ray.config import load_study
from clinft_ray.demo import judge_server, prepare_demo
from clinft_ray.study import run_study

from helpers import trimmed

pytestmark = pytest.mark.slow

SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e-3]}, "max_steps": 10, "eval_steps": 5, "batch_size": 8}
DPO = {"stage": "dpo", "learning_rate": {"grid": [1.0e-3]}, "beta": {"grid": [0.1]}, "max_steps": 4,
       "eval_steps": 2, "batch_size": 8}
# Each task's splits trimmed: every kind is scored by its own metric and test at every stage, on enough
# test rows for its paired test (the generation tasks, scored by generating, cost most per row).
ROWS = {"train": 80, "eval": 16, "dev": 16, "test": 30}


@pytest.fixture(scope="module")
def all_kinds(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("all")
    config = prepare_demo(out, tasks="all")
    (out / "sft.yaml").write_text(yaml.safe_dump(SFT))
    (out / "dpo.yaml").write_text(yaml.safe_dump(DPO))
    trims = []
    for i, task in enumerate(yaml.safe_load(config.read_text())["tasks"]):
        source = (config.parent / task["splits"]["test"]).parent
        for split, path in trimmed(source, out / "small" / task["name"], ROWS).items():
            trims.append(f"tasks.{i}.splits.{split}={path}")
    server, url = judge_server.start()
    try:
        served = judge_server._Handler.requests_served
        study = load_study(config, [f"judge.base_url={url}", "sft.space=sft.yaml", "dpo.space=dpo.yaml", *trims])
        results = run_study(study)
        return out, results, judge_server._Handler.requests_served - served
    finally:
        server.shutdown()


def test_every_kind_reports_its_metrics(all_kinds):
    _, results, judged = all_kinds
    t = results["tasks"]
    assert set(t) == {"uti", "triage", "reasoning", "summarization"}
    for stage in ("base", "sft", "dpo"):
        assert {"f1", "accuracy"} <= set(t["uti"]["stages"][stage]["test"])
        assert {"f1_urgency", "f1_responder", "f1"} <= set(t["triage"]["stages"][stage]["test"])
        assert 0.0 <= t["reasoning"]["stages"][stage]["test"]["accuracy"] <= 1.0
        summ = t["summarization"]["stages"][stage]["test"]
        assert 1.0 <= summ["judge"] <= 5.0 and 0.0 <= summ["rougeL"] <= 1.0
    assert judged > 0  # the summaries really went to the HTTP judge


def test_right_test_per_outcome_and_bonferroni_over_outcomes(all_kinds):
    _, results, _ = all_kinds
    assert results["comparisons_m"] == 5  # uti, triage x2, reasoning, summarization: the paper's 5
    assert results["threshold"] == pytest.approx(0.01)
    tests = {(name, c["outcome"]): c["test"] for name, t in results["tasks"].items() for c in t["comparisons"]}
    assert tests[("summarization", "score")] == "paired_t"
    for key in [("uti", "correct"), ("triage", "correct_urgency"), ("triage", "correct_responder"),
                ("reasoning", "correct")]:
        assert tests[key].startswith("mcnemar"), key
    assert len(results["tasks"]["triage"]["comparisons"]) == 6  # 3 pairs x 2 label sets


def test_outcomes_file_has_numbers_not_text(all_kinds):
    out, results, _ = all_kinds
    lines = [json.loads(line) for line in (out / "outcomes.jsonl").read_text().splitlines()]
    triage = next(o for o in lines if o["task"] == "triage")
    assert set(triage) == {"task", "stage", "id", "correct_urgency", "correct_responder", "pred_urgency",
                           "gold_urgency", "pred_responder", "gold_responder"}
    assert triage["pred_urgency"] in ("urgent", "non-urgent") and triage["gold_responder"] in ("physician",
                                                                                               "medical assistant")
    reasoning = [o for o in lines if o["task"] == "reasoning"]  # multiple choice: the letters
    assert all(o["gold"] in "ABCDE" and (o["pred"] is None or o["pred"] in "ABCDE") for o in reasoning)
    assert all(o["correct"] == (o["pred"] == o["gold"]) for o in reasoning)
    summ = [o for o in lines if o["task"] == "summarization"]
    assert len(summ) == 3 * results["tasks"]["summarization"]["n_test"]
    assert all(isinstance(o["score"], float) and 1 <= o["score"] <= 5 for o in summ)
    report = (out / "report.md").read_text()
    assert "| triage | f1_urgency |" in report and "| summarization | judge |" in report
    assert "| metrics on test | unparsed |" in report
    for name, t in results["tasks"].items():  # every stage counts the answers it could not read
        for stage in ("base", "sft", "dpo"):
            test = t["stages"][stage]["test"]
            assert 0 <= test["unparsed"] <= t["n_test"], (name, stage)
            assert test["unparsed_rate"] == pytest.approx(test["unparsed"] / t["n_test"])
