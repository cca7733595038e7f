"""Task kinds against hand-worked values: triage parsing and per-set F1, option letters, normalized
match, ROUGE-L, gold-answer checks, and which paired test each kind of outcome gets."""

from __future__ import annotations

import pytest

from clinft_ray.analysis import compare
from clinft_ray.config import ReasoningTask, SummarizationTask, TriageTask
from clinft_ray.data import Example
from clinft_ray.evaluate import Scored
from clinft_ray.tasks import (
    NO_LABEL,
    answer_matches,
    gold_check,
    option_letter,
    parse_triage,
    reasoning_scores,
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
    assert outcomes["correct_urgency"] == [True, False, True, True]
    assert outcomes["correct_responder"] == [True, False, True, True]
    # the labels themselves, for a confusion matrix: gold U U N N vs predicted U N N N
    assert outcomes["gold_urgency"] == ["urgent", "urgent", "non-urgent", "non-urgent"]
    assert outcomes["pred_urgency"] == ["urgent", "non-urgent", "non-urgent", "non-urgent"]
    assert outcomes["pred_responder"] == ["physician", "physician", "physician", "medical assistant"]
    assert metrics["unparsed"] == 0 and metrics["unparsed_rate"] == 0.0


def test_triage_counts_answers_without_a_label_for_some_set():
    """Four answers: one gives both sets, one only urgency, one only responder, one neither:
    3 unparsed of 4 -> unparsed_rate 0.75; an unparsed set is None in the outcomes and counts wrong."""
    gold = ["urgent; physician"] * 4
    said = ["urgent; physician", "urgent", "physician", "no idea"]
    metrics, outcomes = triage_scores(TRIAGE, [ex(i, g) for i, g in enumerate(gold)],
                                      [parse_triage(s, TRIAGE) for s in said])
    assert metrics["unparsed"] == 3 and metrics["unparsed_rate"] == 0.75
    assert outcomes["pred_urgency"] == ["urgent", "urgent", None, None]
    assert outcomes["correct_responder"] == [True, False, True, False]


@pytest.mark.parametrize(
    "answer, urgency, responder",
    [
        ("Non-urgent; medical assistant.", "non-urgent", "medical assistant"),
        ("nonurgent; medical assistant", "non-urgent", "medical assistant"),
        ("URGENT - physician should call today", "urgent", "physician"),
        ("urgent physician", "urgent", "physician"),
        ("Urgency: urgent. Responder: physician.", "urgent", "physician"),
        ("Not urgent; physician", "non-urgent", "physician"),  # the negation stops at the next label
        ("Not urgent, and a medical assistant can reply", "non-urgent", "medical assistant"),
        ("This is urgent but does not need a physician: a medical assistant can call back", "urgent",
         "medical assistant"),
        ("Non-urgent message, can be handled by the medical assistant, no physician needed", "non-urgent",
         "medical assistant"),
        ("Urgent; physician or medical assistant", "urgent", NO_LABEL),
        ("no idea", NO_LABEL, NO_LABEL),
    ],
)
def test_triage_reads_each_set_from_one_answer(answer, urgency, responder):
    assert parse_triage(answer, TRIAGE) == {"urgency": urgency, "responder": responder}


OPTIONS = {"A": "Acute cystitis", "B": "Pneumonia", "C": "Acute appendicitis", "D": "Urinary tract infection"}


@pytest.mark.parametrize(
    "answer, letter",
    [
        ("C", "C"),
        ("C.", "C"),
        ("(C)", "C"),
        ("(b)", "B"),
        ("[D]", "D"),
        ("A. Acute cystitis", "A"),
        ("C) Acute appendicitis", "C"),
        ("Answer: B", "B"),
        ("Answer: C) Acute appendicitis", "C"),
        ("The answer is (C)", "C"),
        ("The correct answer is D: urinary tract infection", "D"),
        ("Option C", "C"),
        ("I would choose B", "B"),
        ("The answer is A because the urinalysis shows pyuria", "A"),
        ("Based on the right lower quadrant pain, the answer is C.", "C"),
        ("Not option A; option C is right", "C"),
        ("Option A is wrong, option C", "C"),
        ("A urinary tract infection", "D"),  # the article is not option A
        ("I think acute appendicitis.", "C"),  # "I" is not option I, the text names C
        ("It is pneumonia", "B"),
        ("Acute appendicitis rather than acute cystitis", "C"),
        ("D-dimer is normal, so pneumonia", "B"),  # "D-dimer" is not option D
        ("Acute cystitis or pneumonia", None),  # two options: ambiguous
        ("A or C", None),
        ("F", None),  # not one of the options
        ("Zebra", None),
    ],
)
def test_option_letter_as_a_clinician_reads_it(answer, letter):
    assert option_letter(answer, OPTIONS) == letter


def test_reasoning_reports_letters_and_unparsed():
    """Three option rows, gold B, B, A; answers pick B, nothing, C: accuracy 1/3, unparsed 1 of 3."""
    opts = {"A": "Acute cystitis", "B": "Pneumonia", "C": "Acute appendicitis"}
    examples = [ex(0, "B", opts), ex(1, "B. Pneumonia", opts), ex(2, "A", opts)]
    task = ReasoningTask(name="r", kind="reasoning", grading="match", splits=SPLITS)
    metrics, outcomes = reasoning_scores(task, examples, ["The answer is (B)", "I am not sure", "C"], None)
    assert metrics == {"accuracy": pytest.approx(1 / 3), "unparsed": 1, "unparsed_rate": pytest.approx(1 / 3)}
    assert outcomes == {"correct": [True, False, False], "pred": ["B", None, "C"], "gold": ["B", "B", "A"]}


def test_normalized_match():
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


def test_a_stage_that_predicts_one_label_for_all_is_flagged_in_one_line_without_text(caplog):
    import logging

    from clinft_ray.study import warn_one_prediction
    from clinft_ray.tasks import one_prediction

    same = {"correct_urgency": [True, False, True], "pred_urgency": ["urgent"] * 3,
            "pred_responder": ["physician", "medical assistant", None]}
    assert one_prediction(same) == {"pred_urgency": "urgent"}
    assert one_prediction({"pred": [None, None]}) == {"pred": None}  # nothing parsed, ever
    assert one_prediction({"pred": ["B"]}) == {}  # one example says nothing about a stage
    assert one_prediction({"score": [4.0, 4.0]}) == {}  # a score is not a prediction
    with caplog.at_level(logging.WARNING, logger="clinft"):
        warn_one_prediction("triage", "sft", Scored({}, ["a", "b", "c"], same, ["CANARY-PHI"] * 3))
        warn_one_prediction("triage", "dpo", Scored({}, ["a", "b"], {"pred_urgency": ["urgent", "non-urgent"]}, []))
    [record] = caplog.records
    msg = record.getMessage()
    assert "[triage] sft" in msg and "all 3 test examples" in msg and "pred_urgency 'urgent'" in msg
    assert "CANARY" not in msg and "\n" not in msg
