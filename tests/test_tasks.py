"""Parsing free-text answers to labels, and F1 / accuracy against hand-worked counts."""

import pytest

from clinft_ray.config import ClassificationTask
from clinft_ray.tasks import NO_LABEL, classification_metrics, parse_label

SPLITS = {s: f"data/{s}.jsonl" for s in ("train", "eval", "dev", "test")}
URGENCY = ["urgent", "non-urgent"]


def task(labels: list[str], positive_label: str | None = None) -> ClassificationTask:
    return ClassificationTask(name="t", kind="classification", labels=labels, positive_label=positive_label, splits=SPLITS)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("uti.", "UTI"),  # case and punctuation
        ("  UTI!!  ", "UTI"),
        ("Pyuria, not UTI: the culture was negative.", "pyuria"),  # the label it starts with wins
        ("Likely UTI; pyuria is also present", "UTI"),  # else the label mentioned first
        ("The answer is pyuria because...", "pyuria"),
        ("UTIs", NO_LABEL),  # a label must be a whole word
        ("I cannot tell", NO_LABEL),
        ("", NO_LABEL),
    ],
)
def test_parse_label_uti(answer, expected):
    assert parse_label(answer, ["UTI", "pyuria"]) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Non-urgent.", "non-urgent"),  # longest label first: not read as "urgent"
        ("non urgent", "non-urgent"),
        ("The case is non-urgent since vitals are stable", "non-urgent"),
        ("URGENT - send to ED", "urgent"),
        ("Answer: Urgent", "urgent"),
        ("urgently", NO_LABEL),
    ],
)
def test_parse_label_longest_label_first(answer, expected):
    assert parse_label(answer, URGENCY) == expected
    assert parse_label(answer, list(reversed(URGENCY))) == expected  # label order does not matter


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
