"""Scenario: small whole studies on each of the paper's real tokenizers (Mistral-7B-Instruct-v0.2's
sentencepiece, Llama-3-Instruct's tiktoken BPE, each with its chat template, on a tiny random model of
its architecture and vocabulary; `tests/real_tokenizers.py`).

- The demo's UTI classification scored by `loglik`: SFT from the random model, selected on dev, then
  one DPO trial seeded from it. SFT learns the task as scored by clinft-ray itself, to a test F1 of the
  same order as the demo's own tokenizer reaches (the shared demo study). Before scoring tokenized
  prompt and answer as one text, a Mistral-tokenizer model that had learned the labels scored F1 0.000.
- The demo's multiple-choice reasoning scored by `generate` (answers parsed into option letters), on a
  few rows and two steps per stage: the generation path runs end to end on both templates (Mistral's
  refuses a system role and demands alternating turns) with every answer accounted for.

Sizes: at hidden size 32, a training step with Llama 3's 128,256-token vocabulary takes about 5 s on
two CPUs (its logits and TRL's entropy metric span the vocabulary), so each study runs one trial at a
time on both CPUs, the classification one SFT configuration per family (the one measured to learn the
task on that model, below), and scores trimmed eval/dev/test splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clinft_ray.config import load_study
from clinft_ray.study import run_study

pytestmark = pytest.mark.slow

CLASSIFY = {  # the rows kept of each split (train whole: the model learns from it)
    "rows": {"train": 300, "eval": 40, "dev": 60, "test": 100},
    "sft": {"stage": "sft", "learning_rate": {"grid": [1.0e-2]}, "max_steps": 40, "eval_steps": 20,
            "batch_size": 8, "lr_scheduler": "constant"},
    # (learning rate, steps) per family, as measured on these models with these splits: Mistral's
    # (hidden 64) reaches dev F1 1.0 at 3e-3 by step 40 and stays there at 60 (at 1e-2 it is still at
    # 0.667 at step 60, and at hidden 32 whether it learns by step 60 depends on the run); Llama 3's
    # (hidden 32) reaches 1.0 at 1e-2 by step 40.
    "recipe": {"mistral": (3.0e-3, 60), "llama3": (1.0e-2, 40)},
    "dpo": {"stage": "dpo", "learning_rate": {"grid": [1.0e-4]}, "beta": {"grid": [0.1]}, "max_steps": 2,
            "eval_steps": 2, "batch_size": 8, "lr_scheduler": "constant"},
}
GENERATE = {
    "rows": {"train": 16, "eval": 8, "dev": 8, "test": 12},
    "sft": {**CLASSIFY["sft"], "max_steps": 2, "eval_steps": 2},
    "dpo": {**CLASSIFY["dpo"], "max_steps": 1, "eval_steps": 1},
}
FAMILIES = ("mistral", "llama3")


def trimmed(source: Path, out: Path, rows: dict[str, int]) -> dict[str, str]:
    out.mkdir(parents=True)
    for split, n in rows.items():
        lines = (source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {split: str(out / f"{split}.jsonl") for split in rows}


def study_on(model: Path, demo_dir: Path, out: Path, kind: str, plan: dict, recipe: tuple[float, int] | None = None,
             **task) -> dict:
    sft = plan["sft"] if recipe is None else {**plan["sft"], "learning_rate": {"grid": [recipe[0]]}, "max_steps": recipe[1]}
    (out / "sft.yaml").write_text(yaml.safe_dump(sft))
    (out / "dpo.yaml").write_text(yaml.safe_dump(plan["dpo"]))
    config = yaml.safe_load((demo_dir / "study.yaml").read_text())
    config.update(study=f"real-{out.name}")
    config["model"]["name_or_path"] = str(model)
    config["sft"]["space"], config["dpo"]["space"] = "sft.yaml", "dpo.yaml"
    config["resources"]["cpus_per_trial"] = 2  # one trial at a time: both CPUs (torch threads) for it
    config["tasks"] = [{**task, "kind": kind, "splits": trimmed(demo_dir / "data" / kind, out / "data", plan["rows"])}]
    (out / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_study(load_study(out / "study.yaml"))


@pytest.fixture(scope="module")
def classified(real_models, demo_dir, tmp_path_factory, ray_session) -> dict[str, dict]:
    task = {"name": "uti", "labels": ["UTI", "pyuria"], "positive_label": "UTI", "scoring": "loglik"}
    return {f: study_on(real_models[f], demo_dir, tmp_path_factory.mktemp(f"{f}-uti"), "classification", CLASSIFY,
                        recipe=CLASSIFY["recipe"][f], **task) for f in FAMILIES}


@pytest.fixture(scope="module")
def reasoned(real_models, demo_dir, tmp_path_factory, ray_session) -> dict[str, tuple[dict, Path]]:
    task = {"name": "mcq", "grading": "match", "max_new_tokens": 8}
    out = {}
    for f in FAMILIES:
        folder = tmp_path_factory.mktemp(f"{f}-mcq")
        out[f] = study_on(real_models[f], demo_dir, folder, "reasoning", GENERATE, **task), folder
    return out


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


def test_generated_answers_run_end_to_end_on_every_template(reasoned):
    for family, (results, folder) in reasoned.items():
        stages = results["tasks"]["mcq"]["stages"]
        for name in ("base", "sft", "dpo"):
            test = stages[name]["test"]
            assert 0.0 <= test["accuracy"] <= 1.0 and 0 <= test["unparsed"] <= GENERATE["rows"]["test"], (family, name)
        rows = [json.loads(line) for line in (folder / "outcomes.jsonl").read_text().splitlines()]
        assert len([r for r in rows if r["task"] == "mcq" and r["stage"] == "sft"]) == GENERATE["rows"]["test"]
        # a generated answer is parsed to an option letter or to nothing; its text stays in memory
        assert all(r.get("pred") in (None, "A", "B", "C", "D") and "answer" not in r for r in rows), rows[:3]
