"""Task kinds: check a gold answer, turn a model's answer into a prediction, score, aggregate.

Each kind yields per-example outcomes (for the paired tests) and aggregate metrics (for selection
and the report):

| kind | outcome(s) per example | metrics | selection metric |
|---|---|---|---|
| classification | `correct` | `f1` (binary of `positive_label`, else macro), `accuracy` | `f1` |
| triage | `correct_<set>` per label set | `f1_<set>`, `accuracy_<set>`, `f1` = their mean | `f1` |
| reasoning | `correct` (option letter, normalized match, or judge) | `accuracy` | `accuracy` |
| summarization | `score` (judge, 1-5) | `judge` (mean), `rougeL` | `judge` |

F1 and accuracy come from scikit-learn, ROUGE-L from `rouge-score`.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Callable
from typing import Any

from sklearn.metrics import accuracy_score, f1_score

from clinft_ray.config import ClassificationTask, ReasoningTask, TaskConfig, TriageTask
from clinft_ray.data import Example, load_split

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


def label_metrics(labels: list[str], positive: str | None, gold: list[str], pred: list[str]) -> dict[str, float]:
    """F1 and accuracy. An unparseable answer counts as wrong (its own class, never a positive)."""
    if positive is not None:
        # F1 of the positive class; `labels=` (not average="binary") tolerates NO_LABEL predictions.
        f1 = f1_score(gold, pred, labels=[positive], average="macro", zero_division=0.0)
    else:
        f1 = f1_score(gold, pred, labels=labels, average="macro", zero_division=0.0)
    return {"f1": float(f1), "accuracy": float(accuracy_score(gold, pred))}


def classification_metrics(task: ClassificationTask, gold: list[str], pred: list[str]) -> dict[str, float]:
    return label_metrics(task.labels, task.positive_label, gold, pred)


# -- triage ------------------------------------------------------------------------------------------

def parse_triage(text: str, task: TriageTask) -> dict[str, str]:
    """One label per label set, each parsed from the same answer."""
    return {name: parse_label(text, ls.labels) for name, ls in task.label_sets.items()}


def triage_answers(task: TriageTask) -> list[dict[str, str]]:
    """Every combination of labels, for log-likelihood scoring."""
    names = list(task.label_sets)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(task.label_sets[n].labels for n in names))]


def triage_scores(task: TriageTask, examples: list[Example], preds: list[dict[str, str]]) -> tuple[dict, dict]:
    """(metrics, outcomes): F1 and accuracy per label set, `f1` their mean; `correct_<set>` per example."""
    metrics: dict[str, float] = {}
    outcomes: dict[str, list[bool]] = {}
    for name, ls in task.label_sets.items():
        gold = [parse_triage(e.chosen, task)[name] for e in examples]
        pred = [p[name] for p in preds]
        m = label_metrics(ls.labels, ls.positive_label, gold, pred)
        metrics[f"f1_{name}"], metrics[f"accuracy_{name}"] = m["f1"], m["accuracy"]
        outcomes[f"correct_{name}"] = [g == p for g, p in zip(gold, pred, strict=True)]
    metrics["f1"] = sum(metrics[f"f1_{n}"] for n in task.label_sets) / len(task.label_sets)
    return metrics, outcomes


# -- reasoning -------------------------------------------------------------------------------------

def option_letter(text: str, options: dict[str, str]) -> str | None:
    """The option an answer picks: a leading letter ("C", "(C)", "C. ...", "Answer: C"), else the
    option whose text it states; None if neither."""
    m = re.match(r"\s*(?:answer\s*(?:is)?\s*:?\s*)?\(?([A-Za-z])\)?(?:[.):\s]|$)", text, flags=re.I)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    said = _norm(text)
    for letter, option in sorted(options.items(), key=lambda kv: -len(kv[1])):
        if _norm(option) and _norm(option) in said:
            return letter
    return None


def answer_matches(answer: str, gold: str) -> bool:
    """Normalized match: the gold answer, ignoring case and punctuation, is what the answer says or
    how it starts."""
    a, g = _norm(answer), _norm(gold)
    return bool(g) and (a == g or a.startswith(g + " "))


def reasoning_correct(task: ReasoningTask, examples: list[Example], answers: list[str], judge: Any) -> list[bool]:
    """Correct per example: option letters where a row has `options`, else match or the judge."""
    correct: list[bool | None] = []
    for e, a in zip(examples, answers, strict=True):
        if e.options:
            correct.append(option_letter(a, e.options) == option_letter(e.chosen, e.options))
        elif task.grading == "match":
            correct.append(answer_matches(a, e.chosen))
        else:
            correct.append(None)
    pending = [i for i, c in enumerate(correct) if c is None]
    if pending:
        graded = judge.grade_answers([prompt_text(examples[i].prompt) for i in pending],
                                     [examples[i].chosen for i in pending], [answers[i] for i in pending])
        for i, g in zip(pending, graded, strict=True):
            correct[i] = g
    return [bool(c) for c in correct]


# -- summarization ---------------------------------------------------------------------------------

def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure)


# -- shared ----------------------------------------------------------------------------------------

def prompt_text(prompt: Any) -> str:
    """A prompt as plain text (chat messages joined), for the judge."""
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)


def gold_check(task: TaskConfig) -> Callable[[dict[str, Any]], str | None]:
    """A per-row check of the gold answer for the task's kind: a problem (no row text) or None."""

    def check(row: dict[str, Any]) -> str | None:
        gold = str(row["chosen"]).strip()
        if isinstance(task, ClassificationTask) and gold not in task.labels:
            return f"'chosen' is not one of the task's labels {task.labels}; fix the label"
        if isinstance(task, TriageTask):
            parsed = parse_triage(gold, task)
            bad = [n for n, lab in parsed.items() if lab == NO_LABEL]
            if bad:
                return (f"'chosen' names no label of set(s) {bad}; write it as "
                        f"{task.template!r} with labels from {[task.label_sets[n].labels for n in bad]}")
        options = row.get("options")
        if isinstance(task, ReasoningTask) and options is not None:
            if not isinstance(options, dict) or not options:
                return "'options' must map letters to answer texts, e.g. {\"A\": ..., \"B\": ...}"
            if option_letter(gold, {str(k).upper(): str(v) for k, v in options.items()}) is None:
                return f"'chosen' picks none of the options {sorted(options)}; start it with the option letter"
        return None

    return check


def load_task_split(task: TaskConfig, split: str) -> list[Example]:
    """One split of a task, with the checks of its kind."""
    return load_split(getattr(task.splits, split), gold_check(task))
