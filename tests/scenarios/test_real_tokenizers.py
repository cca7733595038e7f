"""Scenario: a small whole study on each of the paper's real tokenizers (Mistral-7B-Instruct-v0.2's
sentencepiece, Llama-3-Instruct's tiktoken BPE, each with its chat template, on a tiny random model of
its architecture and vocabulary; `tests/helpers/real_tokenizers.py`): the demo's UTI classification
scored by `loglik`, SFT from the random model, selected on dev, then one DPO trial seeded from it.
SFT learns the task as scored by clinft-ray itself, to a test F1 of the same order as the demo's own
tokenizer reaches (the shared demo study). Before scoring tokenized prompt and answer as one text, a
Mistral-tokenizer model that had learned the labels scored F1 0.000. (Generation on both templates
is `tests/unit/test_evaluate.py`; the generation path of a whole study is the all-kinds scenario.)

Sizes: a training step's cost on CPU is the logits of every position over the whole vocabulary
(TRL's chunked loss scores every position where Triton is absent): with Llama 3's 128,256 tokens, about
5 s for 8 rows of the demo's prompts (93 tokens each) on two CPUs. So the demo's cases are shortened
to what decides their label (`short`: the visit and the urinalysis, without the question, the age and
the incidental findings; 46 tokens a row), each study runs one trial at a time on both CPUs, one SFT
configuration per family (the one measured to learn the shortened task on that model, below), and
the eval split (TRL's eval loss, whose logits are not chunked) is cut to 8 rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clinft_ray.config import load_study
from clinft_ray.study import run_study

from helpers import small_study, trimmed

pytestmark = pytest.mark.slow

CLASSIFY = {  # the rows kept of each split (train whole: the model learns from it)
    "rows": {"train": 300, "eval": 8, "dev": 60, "test": 100},
    "sft": {"stage": "sft", "learning_rate": {"grid": [1.0e-2]}, "max_steps": 40, "eval_steps": 10,
            "batch_size": 8, "lr_scheduler": "constant"},
    # (learning rate, steps) per family, as measured on these models with these shortened splits (dev
    # F1 by eval every 10 steps): Mistral's (hidden 64) at 3e-3: 0.67, 0.67, 1.0, 1.0; Llama 3's
    # (hidden 32) at 1e-2: 0.0, 0.42, 1.0 (and 1.0 at step 40 in a longer run). On the demo's whole
    # prompts Mistral needed 60 steps and Llama 3 40.
    "recipe": {"mistral": (3.0e-3, 40), "llama3": (1.0e-2, 30)},
    "dpo": {"stage": "dpo", "learning_rate": {"grid": [1.0e-4]}, "beta": {"grid": [0.1]}, "max_steps": 2,
            "eval_steps": 2, "batch_size": 8, "lr_scheduler": "constant"},
}
FAMILIES = ("mistral", "llama3")


def short(row: dict) -> dict:
    """A demo UTI row cut to what decides its label: "UTI or pyuria? clinic with dysuria. Urinalysis
    shows 14 WBC per high power field." (a pyuria-only case keeps its denial of symptoms)."""
    from clinft_ray.demo.make_uti_data import _EXTRAS

    case = row["prompt"].split("\n\n", 1)[1]
    for extra in _EXTRAS:
        case = case.replace(" " + extra, "")
    return {**row, "prompt": "UTI or pyuria? " + re.sub(r"^A \d+-year-old (woman|man) presents to the ", "", case)}


def shortened(source: Path, out: Path, rows: dict[str, int]) -> dict[str, str]:
    """The trimmed splits with every case `short`; a shortened case that is also a training case (two
    cases can differ only in what was cut) is left out of the other splits, as validation demands."""
    splits = trimmed(source, out, rows)
    seen: set[str] = set()
    for split in ("train", *[s for s in splits if s != "train"]):
        path = Path(splits[split])
        cut = [short(json.loads(line)) for line in path.read_text().splitlines()]
        kept = cut if split == "train" else [r for r in cut if r["prompt"] not in seen]
        if split == "train":
            seen = {r["prompt"] for r in cut}
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return splits


def study_on(model: Path, demo_dir: Path, out: Path, recipe: tuple[float, int]) -> dict:
    """The demo's UTI study (`helpers.small_study`) on `model`, on the shortened splits, with the
    family's SFT `recipe` (learning rate, steps) and one DPO trial, one trial at a time."""
    splits = shortened(demo_dir / "data" / "classification", out / "short", CLASSIFY["rows"])
    sft = {**CLASSIFY["sft"], "learning_rate": {"grid": [recipe[0]]}, "max_steps": recipe[1]}
    sets = (f"study=real-{out.name}", f"model.name_or_path={model}",
            "resources.cpus_per_trial=2",  # one trial at a time: both CPUs (torch threads) for it
            *(f"tasks.0.splits.{split}={path}" for split, path in splits.items()))
    return run_study(load_study(small_study(demo_dir, out, sft=sft, dpo=CLASSIFY["dpo"], rows=None, sets=sets)))


@pytest.fixture(scope="module")
def classified(real_models, demo_dir, tmp_path_factory, ray_session) -> dict[str, dict]:
    return {f: study_on(real_models[f], demo_dir, tmp_path_factory.mktemp(f"{f}-uti"), CLASSIFY["recipe"][f])
            for f in FAMILIES}


def test_sft_learns_the_classification_on_every_tokenizer(classified, demo_run):
    demo_f1 = demo_run[1]["tasks"]["uti"]["stages"]["sft"]["test"]["f1"]
    f1 = {f: classified[f]["tasks"]["uti"]["stages"]["sft"]["test"]["f1"] for f in FAMILIES}
    print(f"test F1 after SFT: {f1}, demo tokenizer {demo_f1:.3f}")  # reported in the note
    for family in FAMILIES:
        stages = classified[family]["tasks"]["uti"]["stages"]
        assert f1[family] >= 0.8, f"{family}: SFT test F1 {f1[family]:.3f}: the scored answers are not the trained ones"
        assert f1[family] >= demo_f1 - 0.15, (f1, demo_f1)
        assert f1[family] > stages["base"]["test"]["f1"] or stages["base"]["test"]["f1"] >= 0.9
        assert stages["sft"]["dev"]["f1"] >= 0.8  # the checkpoint selected on dev is one that learned
        assert stages["sft"]["test"]["unparsed"] == 0
        assert stages["dpo"]["trials"] == 1 and 0.0 <= stages["dpo"]["test"]["f1"] <= 1.0
