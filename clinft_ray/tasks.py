"""Task kinds: turn a model's answer into a prediction, score each example, aggregate.

`classification`: the answer is parsed to one of the task's labels; each example is correct or not;
the task's metric is F1 (binary with `positive_label`, else macro over the labels, from scikit-learn)
and accuracy is reported beside it.
"""

from __future__ import annotations

import re
import string

from sklearn.metrics import accuracy_score, f1_score

from clinft_ray.config import TaskConfig

NO_LABEL = "<none>"


def _norm(text: str) -> str:
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return re.sub(r"\s+", " ", text).strip()


def parse_label(text: str, labels: list[str]) -> str:
    """The label a free-text answer gives, robust to case, punctuation and a trailing explanation.

    The label the answer starts with wins; otherwise the label mentioned first; otherwise `NO_LABEL`.
    Longer labels are tried first so that "non-urgent" is not read as "urgent".
    """
    answer = _norm(text)
    by_length = sorted(labels, key=lambda lab: -len(_norm(lab)))
    for lab in by_length:
        if answer == _norm(lab) or answer.startswith(_norm(lab) + " "):
            return lab
    hits = []
    for lab in by_length:
        m = re.search(rf"(?<![a-z0-9]){re.escape(_norm(lab))}(?![a-z0-9])", answer)
        if m and not any(s <= m.start() < e for s, e, _ in hits):
            hits.append((m.start(), m.end(), lab))
    return min(hits)[2] if hits else NO_LABEL


def classification_metrics(task: TaskConfig, gold: list[str], pred: list[str]) -> dict[str, float]:
    """F1 and accuracy. An unparseable answer counts as wrong (its own class, never a positive)."""
    if task.positive_label is not None:
        # F1 of the positive class; `labels=` (not average="binary") tolerates NO_LABEL predictions.
        f1 = f1_score(gold, pred, labels=[task.positive_label], average="macro", zero_division=0.0)
    else:
        f1 = f1_score(gold, pred, labels=task.labels, average="macro", zero_division=0.0)
    return {"f1": float(f1), "accuracy": float(accuracy_score(gold, pred))}
