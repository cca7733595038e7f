"""Scenario: a small study on each of the paper's real tokenizers (Mistral-7B-Instruct-v0.2's sentencepiece,
Llama-3-Instruct's tiktoken BPE, with their chat templates; `tests/real_tokenizers.py`) and, for
comparison, on the demo's own tokenizer: the demo's UTI classification scored by loglik, SFT from the
tiny random model, then one DPO trial. (Generation-scored tasks on these tokenizers are checked in
`tests/test_evaluate.py`: a study with them took about three times as long on a loaded 2-CPU machine.)

What it shows: SFT learns the classification on every tokenizer as scored by clinft-ray itself (test F1
of the same order as with the demo's tokenizer; before scoring tokenized prompt and answer as one text,
the Mistral tokenizer scored a model that had learned the labels at F1 0.000).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from clinft_ray.config import load_study
from clinft_ray.study import run_study

pytestmark = pytest.mark.slow

# Two rates, selected on dev as a study does: the demo's tokenizer learns the task at 3e-3 in 40 steps
# (test F1 0.985) but not at 1e-2 in 60 (0.667); the real vocabularies (32,000 and 128,256 tokens on a
# hidden size of 32) learn slower: with Mistral's, eval loss 2.7 at 3e-3 and 0.27 at 1e-2 by step 40.
SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e-2, 3.0e-3]}, "max_steps": 80, "eval_steps": 20,
       "batch_size": 8, "lr_scheduler": "constant"}
DPO = {"stage": "dpo", "learning_rate": {"grid": [1.0e-4]}, "beta": {"grid": [0.1]}, "max_steps": 2, "eval_steps": 2,
       "batch_size": 8, "lr_scheduler": "constant"}
FAMILIES = ("demo", "mistral", "llama3")


def study_on(family: str, model: Path, demo_dir: Path, out: Path) -> dict:
    shutil.copytree(demo_dir / "data", out / "data")
    (out / "sft.yaml").write_text(yaml.safe_dump(SFT))
    (out / "dpo.yaml").write_text(yaml.safe_dump(DPO))
    config = yaml.safe_load((demo_dir / "study.yaml").read_text())
    config["study"] = f"real-{family}"
    config["model"]["name_or_path"] = str(model)
    config["sft"]["space"], config["dpo"]["space"] = "sft.yaml", "dpo.yaml"
    (out / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_study(load_study(out / "study.yaml"))


@pytest.fixture(scope="module")
def studies(real_models, demo_dir, tmp_path_factory, ray_session) -> dict[str, dict]:
    models = {**real_models, "demo": demo_dir / "model"}
    return {f: study_on(f, models[f], demo_dir, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def test_sft_learns_the_classification_on_every_tokenizer(studies):
    f1 = {f: studies[f]["tasks"]["uti"]["stages"]["sft"]["test"]["f1"] for f in FAMILIES}
    print("test F1 after SFT:", f1)  # reported in the note
    for family in ("mistral", "llama3"):
        stages = studies[family]["tasks"]["uti"]["stages"]
        assert f1[family] >= 0.8, f"{family}: SFT test F1 {f1[family]:.3f}: the scored answers are not the trained ones"
        assert f1[family] >= f1["demo"] - 0.15, f1
        assert stages["sft"]["test"]["f1"] > stages["base"]["test"]["f1"] or stages["base"]["test"]["f1"] >= 0.9
        assert stages["sft"]["trials"] == 2 and stages["dpo"]["trials"] == 1 and 0.0 <= stages["dpo"]["test"]["f1"] <= 1.0
