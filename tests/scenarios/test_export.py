"""Scenario: the models of a finished full fine-tuning study out of it (the shared `small_run`), as a
user gets them: `clinft export` of the study folder and of the versions the study registered in its
local MLflow (sqlite), each loaded in a fresh process that never imports clinft_ray and giving the
logits of the model clinft-ray scored. The LoRA chain and a real `mlflow server`:
tests/scenarios/test_mlflow_server.py."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from clinft_ray.modeling import load_tokenizer
from clinft_ray.tasks import load_task_split

from helpers import clinft_in_process
from helpers.exported import fresh_logits, holds_no_training_state_or_rows, probe, scored_logits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(small_run):
    study, results = small_run
    task = study.config.tasks[0]
    rows = [e for s in ("train", "eval", "dev", "test") for e in load_task_split(task, s)]
    ids = probe(load_tokenizer(study.config.model), [e.prompt for e in rows[-4:]])
    return study, results, ids, [e.prompt for e in rows]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_exported_full_weights_are_the_scored_model_in_a_fresh_process(study, stage, tmp_path, capsys):
    st, results, ids, prompts = study
    out = tmp_path / "model"
    code, errors, text = clinft_in_process(capsys, "export", str(st.config.output_dir), "--stage", stage, "--to",
                                           str(out))
    assert code == 0 and not errors, text
    assert f"{out}: the {stage.upper()} model of uti-demo / uti as merged" in text and "serve: vllm serve" in text
    want = scored_logits(st.config.model, results["tasks"]["uti"]["stages"][stage]["checkpoint"], ids)
    (got,) = fresh_logits([(out, None)], ids, tmp_path)
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-5
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md",
            "clinft_export.json"} <= names
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or "chat_template.jinja" in names
    holds_no_training_state_or_rows(out, prompts)
    card = (out / "MODEL_CARD.md").read_text()
    entry = results["tasks"]["uti"]["stages"][stage]
    assert f"at optimizer step {entry['selected']['step']}" in card and "| train | 300 |" in card
    assert "fine-tuning: full weights" in card and "in float32, a plain Hugging Face model folder" in card
    assert f"{entry['test']['f1']:.3f}" in card and "not been validated for clinical use" in card


def test_the_study_registered_both_stages_and_the_registered_model_exports_the_same(study, tmp_path, capsys):
    st, results, ids, _ = study
    uri = results["mlflow"]["tracking_uri"]
    client = MlflowClient(uri)
    for stage in ("sft", "dpo"):
        version = client.get_model_version_by_alias("uti-demo-uti", stage)
        entry = results["tasks"]["uti"]["stages"][stage]
        assert version.tags["clinft.stage"] == stage and version.tags["clinft.fingerprint"] == results["fingerprint"]
        assert version.tags["clinft.format"] == "checkpoint"  # full weights stay in storage, referenced
        assert version.tags["clinft.checkpoint"] == entry["checkpoint"]
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        metrics = {m.key: m.value for m in model.metrics}
        assert metrics["test/f1"] == pytest.approx(entry["test"]["f1"]) and "dev/f1" in metrics
        assert model.params["step"] == str(entry["selected"]["step"])
    out = tmp_path / "registered"
    code, errors, text = clinft_in_process(capsys, "export", "models:/uti-demo-uti@dpo", "--tracking-uri", uri,
                                           "--to", str(out))
    assert code == 0 and not errors, text
    want = scored_logits(st.config.model, results["tasks"]["uti"]["stages"]["dpo"]["checkpoint"], ids)
    (got,) = fresh_logits([(out, None)], ids, tmp_path)
    assert float((got - want).abs().max()) <= 1e-5
    assert json.loads((out / "clinft_export.json").read_text())["stage"] == "dpo"


@pytest.mark.parametrize(("args", "said"), [
    (["--stage", "dpo", "--format", "adapter"],
     "study uti-demo fine-tuned full weights: there is no adapter; export --format merged"),
    (["--stage", "dpo", "--task", "triage"], "no task 'triage' (it has uti); pass one of them with --task"),
    (["--format", "merged"], "--stage: say which selected model to export, sft or dpo")])
def test_a_wrong_export_is_one_line_and_writes_nothing(study, tmp_path, capsys, args, said):
    st = study[0]
    code, errors, text = clinft_in_process(capsys, "export", str(st.config.output_dir), "--to",
                                           str(tmp_path / "m"), *args)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("clinft: error: ") and errors[0].endswith(said), text
    assert not (tmp_path / "m").exists()
