"""Parsing free-text answers as a clinician reads them (tables of real-looking answers) and scoring them
against hand-worked counts, per task kind: labels and F1 / accuracy for classification, triage parsing
and per-set F1, option letters, normalized match, ROUGE-L, and gold-answer checks."""

import pytest

from clinft_ray.config import ClassificationTask, ReasoningTask, TriageTask
from clinft_ray.data import Example
from clinft_ray.tasks import (
    NO_LABEL,
    answer_matches,
    classification_metrics,
    gold_check,
    option_letter,
    parse_label,
    parse_triage,
    reasoning_scores,
    rouge_l,
    triage_answers,
    triage_scores,
)

SPLITS = {s: f"data/{s}.jsonl" for s in ("train", "eval", "dev", "test")}
URGENCY = ["urgent", "non-urgent"]


def task(labels: list[str], positive_label: str | None = None) -> ClassificationTask:
    return ClassificationTask(name="t", kind="classification", labels=labels, positive_label=positive_label, splits=SPLITS)


# Each answer with the reading a clinician gives it, for the paper's UTI task (UTI = pyuria AND lower
# urinary tract symptoms; "pyuria" = pyuria only). The two labels are exhaustive, so a negated UTI
# reads as pyuria only; two labels said without negation read as no answer.
UTI_ANSWERS = [
    ("UTI", "UTI"),
    ("uti.", "UTI"),  # case and punctuation
    ("  UTI!!  ", "UTI"),
    ("Diagnosis: UTI", "UTI"),
    ("UTI - dysuria plus pyuria on urinalysis", "UTI"),  # the answer leads; the explanation names the finding
    ("Likely UTI; pyuria is also present", "UTI"),
    ("The patient has pyuria and dysuria, consistent with a UTI.", "UTI"),  # pyuria as a finding, UTI concluded
    ("Pyuria with dysuria and frequency indicates a UTI.", "UTI"),
    ("Findings are most consistent with UTI rather than pyuria alone.", "UTI"),
    ("Cannot rule out a UTI.", "UTI"),  # a hedge that leans towards UTI
    ("No UTI", "pyuria"),
    ("Not a UTI.", "pyuria"),
    ("I don't think this is a UTI", "pyuria"),
    ("Doesn't meet criteria for a UTI.", "pyuria"),
    ("Negative for UTI", "pyuria"),
    ("UTI is unlikely.", "pyuria"),
    ("UTI ruled out, asymptomatic pyuria", "pyuria"),
    ("UTI? No.", "pyuria"),
    ("UTI? No - pyuria only.", "pyuria"),
    ("Pyuria without UTI", "pyuria"),
    ("Pyuria, not UTI: the culture was negative.", "pyuria"),
    ("Pyuria only. A UTI would need dysuria or frequency, which she denies.", "pyuria"),
    ("Pyuria (no urinary symptoms)", "pyuria"),
    ("Asymptomatic pyuria; no evidence of UTI.", "pyuria"),
    ("The answer is pyuria because there are no urinary symptoms.", "pyuria"),
    ("Possible UTI, but more likely pyuria only", "pyuria"),
    ("UTI or pyuria", NO_LABEL),  # two labels, neither negated: ambiguous, not the first one
    ("Could be a UTI or just pyuria.", NO_LABEL),
    ("Neither UTI nor pyuria", NO_LABEL),
    ("UTIs", NO_LABEL),  # a label must be a whole word
    ("I cannot tell", NO_LABEL),
    ("", NO_LABEL),
]


@pytest.mark.parametrize("answer, expected", UTI_ANSWERS)
def test_parse_label_uti(answer, expected):
    assert parse_label(answer, ["UTI", "pyuria"]) == expected
    assert parse_label(answer, ["pyuria", "UTI"]) == expected  # label order does not matter


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Non-urgent.", "non-urgent"),  # longest label first: not read as "urgent"
        ("non urgent", "non-urgent"),
        ("nonurgent", "non-urgent"),
        ("The case is non-urgent since vitals are stable", "non-urgent"),
        ("Non-urgent: no red flags", "non-urgent"),
        ("No red flags, non-urgent", "non-urgent"),
        ("Non-urgent, although she should not wait more than a week", "non-urgent"),
        ("Not urgent", "non-urgent"),  # the other of two labels
        ("This is not urgent; routine follow-up", "non-urgent"),
        ("It isn't urgent", "non-urgent"),
        ("Does not seem urgent", "non-urgent"),
        ("Urgent? No.", "non-urgent"),
        ("URGENT - send to ED", "urgent"),
        ("Answer: Urgent", "urgent"),
        ("The message is urgent because of chest pain", "urgent"),
        ("Not non-urgent: call her today", "urgent"),
        ("Urgent, not non-urgent", "urgent"),
        ("Urgent or non-urgent cannot be determined", NO_LABEL),
        ("urgently", NO_LABEL),
    ],
)
def test_parse_label_urgency(answer, expected):
    assert parse_label(answer, URGENCY) == expected
    assert parse_label(answer, list(reversed(URGENCY))) == expected  # label order does not matter


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Medical assistant", "medical assistant"),
        ("physician", "physician"),
        ("Route to the physician", "physician"),
        ("The physician should review this, not the medical assistant", "physician"),
        ("Does not need a physician", "medical assistant"),
        ("Physician not needed", "medical assistant"),
        ("A medical assistant can handle this; no physician needed", "medical assistant"),
        ("Physician or medical assistant", NO_LABEL),
    ],
)
def test_parse_label_responder(answer, expected):
    assert parse_label(answer, ["physician", "medical assistant"]) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Sepsis", "sepsis"),
        ("Sepsis cannot be excluded", "sepsis"),  # "cannot be excluded" leans towards it
        ("No sepsis", "no sepsis"),  # a label that holds a negation is read whole
        ("Negative for sepsis", "no sepsis"),
        ("Sepsis unlikely", "no sepsis"),
        ("Bacteremia without sepsis", "no sepsis"),
        ("Septic", NO_LABEL),
    ],
)
def test_parse_label_with_a_negative_label(answer, expected):
    assert parse_label(answer, ["sepsis", "no sepsis"]) == expected


def test_negation_picks_nothing_among_more_than_two_labels():
    labels = ["cystitis", "pyelonephritis", "urethritis"]
    assert parse_label("Not pyelonephritis", labels) == NO_LABEL  # which of the other two is not said
    assert parse_label("Cystitis, not pyelonephritis", labels) == "cystitis"


def test_binary_f1_unparseable_is_wrong_and_never_positive():
    """positive_label UTI; gold / pred:

        UTI/UTI (TP)  UTI/<none> (FN)  pyuria/<none> (TN: not a positive)  pyuria/pyuria (TN)  pyuria/UTI (FP)

    TP=1, FP=1, FN=1 -> F1 = 2TP / (2TP + FP + FN) = 2 / 4 = 0.5   (were <none> a positive: 2 / 5 = 0.4)
    accuracy = 2 right / 5 = 0.4   (both <none> answers are wrong)
    """
    gold = ["UTI", "UTI", "pyuria", "pyuria", "pyuria"]
    pred = ["UTI", NO_LABEL, NO_LABEL, "pyuria", "UTI"]
    m = classification_metrics(task(["UTI", "pyuria"], "UTI"), gold, pred)
    assert m["f1"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(0.4)


def test_binary_f1_without_any_positive_is_zero_not_nan():
    """No positive in gold or pred: TP = FP = FN = 0, so F1 = 0 / 0, reported as 0.0; accuracy 2 / 2 = 1."""
    m = classification_metrics(task(["UTI", "pyuria"], "UTI"), ["pyuria", "pyuria"], ["pyuria", "pyuria"])
    assert m == {"f1": 0.0, "accuracy": 1.0}


def test_macro_f1_over_labels_only():
    """labels a, b, c (no positive_label); gold / pred: a/a a/b b/b b/<none> c/c c/a

    a: TP=1 FP=1 (c->a) FN=1 (a->b)   F1 = 2 / 4 = 0.5
    b: TP=1 FP=1 (a->b) FN=1 (b->none) F1 = 2 / 4 = 0.5
    c: TP=1 FP=0        FN=1 (c->a)   F1 = 2 / 3
    macro = (1/2 + 1/2 + 2/3) / 3 = 5/9   (<none> is not a class: averaging it in would give 5/12)
    accuracy = 3 / 6 = 0.5
    """
    gold = ["a", "a", "b", "b", "c", "c"]
    pred = ["a", "b", "b", NO_LABEL, "c", "a"]
    m = classification_metrics(task(["a", "b", "c"]), gold, pred)
    assert m["f1"] == pytest.approx(5 / 9)
    assert m["accuracy"] == pytest.approx(0.5)



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
