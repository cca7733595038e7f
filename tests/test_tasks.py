"""Parsing free-text answers to labels as a clinician reads them (tables of real-looking answers), and
F1 / accuracy against hand-worked counts."""

import pytest

from clinft_ray.config import ClassificationTask
from clinft_ray.tasks import NO_LABEL, classification_metrics, parse_label

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
