"""Task kinds against hand-worked values: triage parsing and per-set F1, option letters, normalized
match, ROUGE-L, gold-answer checks, and which paired test each kind of outcome gets."""

from __future__ import annotations

import pytest

from clinft_ray.analysis import compare
from clinft_ray.config import ReasoningTask, SummarizationTask, TriageTask
from clinft_ray.data import Example
from clinft_ray.tasks import (
    NO_LABEL,
    answer_matches,
    gold_check,
    option_letter,
    parse_triage,
    rouge_l,
    triage_answers,
    triage_scores,
)

SPLITS = {s: f"{s}.jsonl" for s in ("train", "eval", "dev", "test")}
TRIAGE = TriageTask(name="t", kind="triage", splits=SPLITS)


def ex(i: int, chosen: str, options: dict | None = None) -> Example:
    return Example(str(i), "p", chosen, "other", options)


def test_triage_parses_both_sets_from_one_answer():
    assert parse_triage("Non-urgent; medical assistant.", TRIAGE) == {"urgency": "non-urgent",
                                                                      "responder": "medical assistant"}
    assert parse_triage("URGENT - physician should call today", TRIAGE) == {"urgency": "urgent",
                                                                            "responder": "physician"}
    assert parse_triage("no idea", TRIAGE) == {"urgency": NO_LABEL, "responder": NO_LABEL}
    assert [TRIAGE.template.format(**c) for c in triage_answers(TRIAGE)] == [
        "urgent; physician", "urgent; medical assistant", "non-urgent; physician", "non-urgent; medical assistant"]


def test_triage_f1_per_label_set_hand_worked():
    """Gold urgency U U N N, predicted U N N N: positive 'urgent' TP 1, FN 1, FP 0 -> F1 = 2/(2+1) = 2/3.
    Gold responder P M P M, predicted P P P M: positive 'physician' TP 2, FP 1 -> F1 = 4/5.
    Mean F1 = (2/3 + 4/5) / 2 = 11/15."""
    gold = ["urgent; physician", "urgent; medical assistant", "non-urgent; physician", "non-urgent; medical assistant"]
    pred = ["urgent; physician", "non-urgent; physician", "non-urgent; physician", "non-urgent; medical assistant"]
    metrics, outcomes = triage_scores(TRIAGE, [ex(i, g) for i, g in enumerate(gold)],
                                      [parse_triage(p, TRIAGE) for p in pred])
    assert metrics["f1_urgency"] == pytest.approx(2 / 3) and metrics["f1_responder"] == pytest.approx(4 / 5)
    assert metrics["f1"] == pytest.approx(11 / 15) and metrics["accuracy_urgency"] == 0.75
    assert outcomes == {"correct_urgency": [True, False, True, True], "correct_responder": [True, False, True, True]}


def test_option_letters_and_normalized_match():
    opts = {"A": "Acute cystitis", "B": "Pneumonia", "C": "Acute appendicitis"}
    for said, letter in [("C", "C"), ("(b)", "B"), ("A. Acute cystitis", "A"), ("Answer: B", "B"),
                         ("I think acute appendicitis.", "C"), ("It is pneumonia", "B"), ("Zebra", None)]:
        assert option_letter(said, opts) == letter, said
    assert answer_matches("Pneumonia.", "pneumonia") and answer_matches("Pneumonia, likely viral", "Pneumonia")
    assert not answer_matches("Not pneumonia", "pneumonia") and not answer_matches("", "")


def test_rouge_l_hand_worked():
    """Reference 'the cat sat on the mat' (6 words), prediction 'the cat on the mat' (5): LCS = 5,
    P = 5/5, R = 5/6, F = 2PR/(P+R) = (10/6)/(11/6) = 10/11."""
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)


def test_gold_checks_per_kind():
    assert gold_check(TRIAGE)({"chosen": "urgent; physician"}) is None
    assert "names no label of set(s) ['responder']" in gold_check(TRIAGE)({"chosen": "urgent; nurse"})
    reasoning = ReasoningTask(name="r", kind="reasoning", splits=SPLITS)
    assert gold_check(reasoning)({"chosen": "free text answer"}) is None
    assert gold_check(reasoning)({"chosen": "B. x", "options": {"A": "x", "B": "y"}}) is None
    assert "picks none of the options" in gold_check(reasoning)({"chosen": "E", "options": {"A": "x", "B": "y"}})
    assert "must map letters" in gold_check(reasoning)({"chosen": "A", "options": ["x", "y"]})


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
