"""Seeded generator of the demo's synthetic UTI-style classification task.

Shaped like the paper's simple classification task: a short clinical passage that describes either a
urinary tract infection (pyuria AND lower urinary tract symptoms) or pyuria only, and the answer `UTI`
or `pyuria`. Every case is made up from templates by this script: there is no patient data here.

    python -m clinft_ray.demo.make_task_data OUT_DIR --kinds classification [--seed 0]

writes `train.jsonl`, `eval.jsonl`, `dev.jsonl` and `test.jsonl` (the paper's 300/200/100/200 rows)
with the columns `id`, `prompt`, `chosen`, `rejected` (see `make_task_data.py` for the other kinds).
"""

from __future__ import annotations

import random

QUESTION = (
    "Does this passage describe a urinary tract infection (pyuria with lower urinary tract "
    "symptoms) or pyuria only? Answer UTI or pyuria."
)
LABELS = ("UTI", "pyuria")
SPLIT_SIZES = {"train": 300, "eval": 200, "dev": 100, "test": 200}

_AGES = range(19, 91)
_SEXES = ("woman", "man")
_SETTINGS = ("clinic", "emergency department", "urgent care", "telehealth visit")
_SYMPTOMS = (
    "dysuria",
    "urinary frequency",
    "urinary urgency",
    "suprapubic pain",
    "burning on urination",
    "new incontinence",
)
_OTHER_REASONS = (
    "follow-up of hypertension",
    "a routine annual physical",
    "preoperative evaluation before knee surgery",
    "medication refill for diabetes",
    "evaluation of a chronic cough",
    "a rash on the forearm",
    "low back pain after lifting",
    "fatigue for two weeks",
)
_NO_SYMPTOMS = (
    "No urinary complaints are reported.",
    "The patient reports no urinary complaints.",
    "Review of systems is otherwise negative.",
)
_EXTRAS = (
    "Vital signs are within normal limits.",
    "Temperature is 37.1 C.",
    "Past history includes hyperlipidemia.",
    "The patient takes lisinopril daily.",
    "There is no flank tenderness.",
    "Creatinine is at baseline.",
)


def make_case(rng: random.Random, label: str) -> str:
    """One passage of the given label, built from the templates above."""
    age, sex, setting = rng.choice(_AGES), rng.choice(_SEXES), rng.choice(_SETTINGS)
    wbc = rng.randint(11, 80)
    extras = rng.sample(_EXTRAS, k=2)
    if label == "UTI":
        symptoms = rng.sample(_SYMPTOMS, k=rng.randint(1, 2))
        visit = f"presents to the {setting} with {' and '.join(symptoms)}."
        middle = f"Urinalysis shows {wbc} WBC per high power field."
    else:
        visit = f"presents to the {setting} for {rng.choice(_OTHER_REASONS)}."
        # Half the pyuria-only cases name urinary symptoms only to deny them: the model has to read
        # the negation, not spot a keyword, which keeps the task from being trivially easy.
        if rng.random() < 0.5:
            denied = " or ".join(rng.sample(_SYMPTOMS, k=2))
            review = f"The patient denies {denied}."
        else:
            review = rng.choice(_NO_SYMPTOMS)
        middle = f"Urinalysis shows {wbc} WBC per high power field. {review}"
    return f"A {age}-year-old {sex} {visit} {middle} {' '.join(extras)}"


def make_rows(rng: random.Random, split: str, n: int) -> list[dict[str, str]]:
    """`n` rows with balanced labels, shuffled; ids are `<split>-<index>`."""
    labels = [LABELS[i % 2] for i in range(n)]
    rng.shuffle(labels)
    rows = []
    for i, label in enumerate(labels):
        other = LABELS[1 - LABELS.index(label)]
        prompt = f"{QUESTION}\n\n{make_case(rng, label)}"
        rows.append({"id": f"{split}-{i:04d}", "prompt": prompt, "chosen": label, "rejected": other})
    return rows
