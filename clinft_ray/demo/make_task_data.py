"""Seeded generators of small synthetic datasets for all four task kinds, shaped like the paper's.

Every row is made up from templates by this script; none of it is patient data.

| kind | like the paper's | answer (chosen) | worse answer (rejected) |
|---|---|---|---|
| classification | UTI vs pyuria only (see make_uti_data.py) | `UTI` / `pyuria` | the other label |
| triage | patient portal messages | `urgent; physician` | a wrong triage |
| reasoning | MedQA-style vignettes with four options | `C. Acute cystitis` | a wrong option |
| summarization | discharge notes | a 2-sentence summary for an internist | a vague summary |

    python -m clinft_ray.demo.make_task_data OUT_DIR [--kinds all] [--seed 0]

writes OUT_DIR/<kind>/{train,eval,dev,test}.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from clinft_ray.demo import make_uti_data

Row = dict[str, object]

# -- triage ----------------------------------------------------------------------------------------
TRIAGE_QUESTION = (
    "Triage this patient portal message. Answer with its urgency (urgent or non-urgent) and who should "
    "respond (physician or medical assistant), written as: urgency; responder."
)
_MESSAGES = {
    ("urgent", "physician"): [
        "I have had crushing chest pain for an hour and I feel short of breath.",
        "Since this morning the left side of my face is drooping and my speech is slurred.",
        "I started the new antibiotic yesterday and now my lips and tongue are swelling.",
        "I am vomiting blood and feel dizzy when I stand up.",
    ],
    ("non-urgent", "physician"): [
        "My home blood pressure readings have been around 150 over 95 for two weeks. Should we change my medication?",
        "Is it safe to take ibuprofen while I am on my blood thinner?",
        "My sugars have been a little higher after dinner lately. Should I adjust my insulin dose?",
        "The rash on my elbow has not improved with the cream. What else can I try?",
    ],
    ("urgent", "medical assistant"): [
        "I ran out of insulin today and the pharmacy says it needs a new prescription sent.",
        "My seizure medication refill was denied and I only have one pill left.",
        "The pharmacy never received my inhaler prescription and I used my last dose this morning.",
    ],
    ("non-urgent", "medical assistant"): [
        "Can I move my appointment next Tuesday to the afternoon?",
        "Please send my vaccination records to my employer.",
        "I need a copy of my last lab results for my insurance company.",
        "Could you fax the referral form to the physical therapy office?",
    ],
}
_OPENERS = ["Hello,", "Hi doctor,", "Good morning,", "Hi there,", ""]
_CLOSERS = ["Thank you.", "Thanks so much.", "Please let me know.", "Sorry to bother you.", ""]
_RELATIVES = ["mother", "father", "husband", "wife", "son", "daughter"]


def triage_row(rng: random.Random, i: int, split: str) -> Row:
    urgency, responder = key = rng.choice(sorted(_MESSAGES))
    about = rng.choice([f"I am {rng.randint(18, 90)} years old.", f"This is about my {rng.choice(_RELATIVES)}.", ""])
    parts = (rng.choice(_OPENERS), about, rng.choice(_MESSAGES[key]), rng.choice(_CLOSERS))
    text = " ".join(p for p in parts if p)
    wrong = rng.choice([k for k in _MESSAGES if k != key])
    return {"id": f"{split}-{i:04d}", "prompt": f"{TRIAGE_QUESTION}\n\nMessage: {text}",
            "chosen": f"{urgency}; {responder}", "rejected": f"{wrong[0]}; {wrong[1]}"}


# -- reasoning -------------------------------------------------------------------------------------
_VIGNETTES = {
    "Acute cystitis": "dysuria and urinary frequency for two days, no fever, and a urinalysis positive for nitrites",
    "Community-acquired pneumonia": "fever, productive cough and right lower lobe crackles, with an infiltrate on chest x-ray",
    "Acute appendicitis": "periumbilical pain that moved to the right lower quadrant, with nausea and rebound tenderness",
    "Diabetic ketoacidosis": "polyuria, abdominal pain and deep rapid breathing, a glucose of 480 and an anion gap acidosis",
    "Pulmonary embolism": "sudden pleuritic chest pain and tachycardia ten days after hip surgery, with a clear chest x-ray",
    "Hypothyroidism": "fatigue, weight gain, cold intolerance and constipation, with a high TSH",
}
REASONING_QUESTION = "Which is the most likely diagnosis? Answer with the letter of the best option."


def reasoning_row(rng: random.Random, i: int, split: str) -> Row:
    answer = rng.choice(sorted(_VIGNETTES))
    choices = [answer, *rng.sample([d for d in _VIGNETTES if d != answer], k=3)]
    rng.shuffle(choices)
    options = dict(zip("ABCD", choices, strict=True))
    letter = next(k for k, v in options.items() if v == answer)
    wrong = rng.choice([k for k in options if k != letter])
    age, sex = rng.randint(18, 85), rng.choice(["woman", "man"])
    listed = "\n".join(f"{k}. {v}" for k, v in options.items())
    prompt = f"A {age}-year-old {sex} presents with {_VIGNETTES[answer]}. {REASONING_QUESTION}\n\n{listed}"
    return {"id": f"{split}-{i:04d}", "prompt": prompt, "options": options,
            "chosen": f"{letter}. {answer}", "rejected": f"{wrong}. {options[wrong]}"}


# -- summarization ---------------------------------------------------------------------------------
_ADMISSIONS = [
    ("community-acquired pneumonia", "intravenous ceftriaxone and azithromycin", "oral amoxicillin", "primary care"),
    ("heart failure exacerbation", "intravenous furosemide", "an increased dose of oral furosemide", "cardiology"),
    ("cellulitis of the left leg", "intravenous cefazolin", "oral cephalexin", "primary care"),
    ("diabetic ketoacidosis", "an insulin infusion and fluids", "basal-bolus insulin", "endocrinology"),
    ("COPD exacerbation", "nebulized bronchodilators and prednisone", "a prednisone taper", "pulmonology"),
]
SUMMARY_QUESTION = "Summarize this discharge note in 2-3 sentences for the patient's internist."


def summary_row(rng: random.Random, i: int, split: str) -> Row:
    dx, inpatient, outpatient, clinic = rng.choice(_ADMISSIONS)
    age, sex, days, weeks = rng.randint(30, 90), rng.choice(["woman", "man"]), rng.randint(2, 7), rng.randint(1, 4)
    note = (f"The patient is a {age}-year-old {sex} admitted with {dx}. Over {days} days the patient was treated "
            f"with {inpatient} and improved. Vital signs were stable at discharge. The patient was discharged home "
            f"on {outpatient}. Follow-up with {clinic} is arranged in {weeks} weeks.")
    gold = (f"{age}-year-old {sex} admitted with {dx}, treated with {inpatient} for {days} days with improvement. "
            f"Discharged on {outpatient} with {clinic} follow-up in {weeks} weeks.")
    vague = "The patient was in the hospital and got better. Follow up as needed."
    return {"id": f"{split}-{i:04d}", "prompt": f"{SUMMARY_QUESTION}\n\n{note}", "chosen": gold, "rejected": vague}


def _uti_rows(rng: random.Random, split: str, n: int) -> list[Row]:
    return make_uti_data.make_rows(rng, split, n)


def _rows(make: Callable[[random.Random, int, str], Row]) -> Callable[[random.Random, str, int], list[Row]]:
    return lambda rng, split, n: [make(rng, i, split) for i in range(n)]


KINDS: dict[str, tuple[Callable[[random.Random, str, int], list[Row]], dict[str, int]]] = {
    "classification": (_uti_rows, make_uti_data.SPLIT_SIZES),
    "triage": (_rows(triage_row), {"train": 300, "eval": 100, "dev": 100, "test": 200}),
    "reasoning": (_rows(reasoning_row), {"train": 300, "eval": 100, "dev": 100, "test": 200}),
    "summarization": (_rows(summary_row), {"train": 200, "eval": 50, "dev": 50, "test": 100}),
}


def write_task(kind: str, out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write one kind's four splits as JSONL into `out_dir`; returns split name -> path."""
    make, sizes = KINDS[kind]
    rng = random.Random(f"{kind}-{seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()  # no prompt in two splits: the study refuses test rows that leak from train
    paths = {}
    for split, n in sizes.items():
        rows: list[Row] = []
        while len(rows) < n:
            for row in make(rng, split, n - len(rows)):
                if row["prompt"] not in seen:
                    seen.add(str(row["prompt"]))
                    rows.append(row)
        for i, row in enumerate(rows):
            row["id"] = f"{split}-{i:04d}"
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--kinds", default="all", help="comma-separated kinds, or all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kinds = list(KINDS) if args.kinds == "all" else args.kinds.split(",")
    for kind in kinds:
        for split, path in write_task(kind, Path(args.out_dir) / kind, args.seed).items():
            print(f"{kind} {split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
