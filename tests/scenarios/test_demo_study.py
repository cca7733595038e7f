"""End to end: the demo study (4 SFT + 12 DPO trials, tiny model, real Ray, real MLflow sqlite).

Asserts outcomes: the files and their agreement, the MLflow run tree with its params, curves, tags
and device-hours, the selection, the statistics recomputed from `outcomes.jsonl`, and that training
changed the weights and DPO started from the selected SFT checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clinft_ray.modeling import read_manifest
from clinft_ray.stats import mcnemar

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(demo_run):
    study, results = demo_run
    out = study.config.output_dir
    client = MlflowClient(tracking_uri=results["mlflow"]["tracking_uri"])
    runs = client.search_runs([results["mlflow"]["experiment_id"]], max_results=1000)
    return study, results, out, client, {r.info.run_id: r for r in runs}


def _children(runs, parent_id):
    return [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _stage_runs(runs, results, task="uti"):
    task_run = [r for r in _children(runs, results["mlflow"]["study_run_id"]) if r.info.run_name == task][0]
    return task_run, {r.data.tags["clinft.stage"]: r for r in _children(runs, task_run.info.run_id)}


def test_output_files_exist_and_agree(demo):
    study, results, out, _, _ = demo
    for name in ("results.json", "outcomes.jsonl", "report.md"):
        assert (out / name).is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    task = results["tasks"]["uti"]
    assert task["metric"] == "f1"
    assert results["alpha"] == 0.05 and results["threshold"] == pytest.approx(0.05 / len(study.config.tasks))
    assert task["stages"]["sft"]["trials"] == 4 and task["stages"]["dpo"]["trials"] == 12
    outcomes = [json.loads(line) for line in (out / "outcomes.jsonl").read_text().splitlines()]
    assert set(outcomes[0]) == {"task", "stage", "id", "correct", "pred", "gold"}  # labels, no text of any kind
    assert {o["pred"] for o in outcomes} <= {"UTI", "pyuria"} and {o["gold"] for o in outcomes} == {"UTI", "pyuria"}
    assert all(o["correct"] == (o["pred"] == o["gold"]) for o in outcomes)
    for stage in ("base", "sft", "dpo"):
        rows = [o for o in outcomes if o["stage"] == stage]
        assert len(rows) == task["n_test"] == 200
        accuracy = sum(o["correct"] for o in rows) / len(rows)
        assert accuracy == pytest.approx(task["stages"][stage]["test"]["accuracy"])
    report = (out / "report.md").read_text()
    assert "| uti | f1 |" in report and "DPO/SFT cost" in report and "McNemar (of accuracy)" in report
    json.dumps(results, allow_nan=False)  # no NaN or inf anywhere
    for comp in task["comparisons"]:  # effect sizes with their CIs, and the bootstrap of each metric
        assert comp["discordant_b"] + comp["discordant_c"] <= 200
        assert comp["odds_ratio_ci"][0] <= comp["odds_ratio"] <= comp["odds_ratio_ci"][1]
        assert set(comp["bootstrap"]) == {"f1", "accuracy"}
        a, b = task["stages"][comp["a"]]["test"], task["stages"][comp["b"]]["test"]
        for metric, boot in comp["bootstrap"].items():
            assert boot["diff"] == pytest.approx(a[metric] - b[metric])  # recomputed from the outcomes
            assert boot["ci"][0] <= boot["diff"] <= boot["ci"][1]
    for stage in ("base", "sft", "dpo"):
        uti = task["clinical"][stage]["correct"]["per_label"]["UTI"]
        assert uti["tp"] + uti["fp"] + uti["fn"] + uti["tn"] == 200
        assert sum(map(sum, task["clinical"][stage]["correct"]["confusion"]["counts"])) == 200


def test_the_demo_shows_learning(demo):
    _, results, _, _, _ = demo
    st = results["tasks"]["uti"]["stages"]
    assert 0.3 <= st["base"]["test"]["accuracy"] <= 0.7  # the random model is near chance
    assert st["sft"]["test"]["f1"] >= st["base"]["test"]["f1"] + 0.2
    assert st["sft"]["test"]["accuracy"] >= 0.75


def test_pvalues_recompute_from_outcomes(demo):
    _, results, out, _, _ = demo
    outcomes = [json.loads(line) for line in (out / "outcomes.jsonl").read_text().splitlines()]
    by_stage = {s: {o["id"]: o["correct"] for o in outcomes if o["stage"] == s} for s in ("base", "sft", "dpo")}
    ids = sorted(by_stage["base"])
    for comp in results["tasks"]["uti"]["comparisons"]:
        res = mcnemar([by_stage[comp["a"]][i] for i in ids], [by_stage[comp["b"]][i] for i in ids])
        assert comp["test"] == res.test
        assert comp["p_value"] == pytest.approx(res.p_value, rel=1e-12)
        assert comp["significant"] == (res.p_value < results["threshold"])


def test_mlflow_run_tree(demo):
    study, results, _, client, runs = demo
    assert all(r.info.status == "FINISHED" for r in runs.values())
    study_run = runs[results["mlflow"]["study_run_id"]]
    assert study_run.data.tags["clinft.kind"] == "study"
    task_run, stages = _stage_runs(runs, results)
    assert set(stages) == {"base", "sft", "dpo"}
    sft_trials = _children(runs, stages["sft"].info.run_id)
    dpo_trials = _children(runs, stages["dpo"].info.run_id)
    assert len(sft_trials) == 4 and len(dpo_trials) == 12
    assert {float(r.data.params["learning_rate"]) for r in sft_trials} == {1e-2, 1e-3, 1e-4, 1e-5}
    assert {(float(r.data.params["learning_rate"]), float(r.data.params["beta"])) for r in dpo_trials} == {
        (lr, b) for lr in (1e-2, 1e-3, 1e-4, 1e-5) for b in (0.1, 0.3, 0.5)
    }
    selected_sft = results["tasks"]["uti"]["stages"]["sft"]["selected"]["mlflow_run_id"]
    for r in sft_trials + dpo_trials:
        p, m, tags = r.data.params, r.data.metrics, r.data.tags
        assert {"learning_rate", "max_steps", "seed", "model"} <= set(p)
        assert p["seed"] == str(study.config.seed)
        assert tags["clinft.task"] == "uti" and tags["clinft.stage"] in ("sft", "dpo")
        assert m["gpu_hours"] == 0.0 and m["cpu_hours"] > 0
        for key in ("train/loss", "eval/loss", "dev/f1"):
            history = client.get_metric_history(r.info.run_id, key)
            assert [h.step for h in history] == sorted({h.step for h in history}) and len(history) >= 2, key
    assert all(r.data.tags["clinft.init_from"] == selected_sft for r in dpo_trials)
    for stage in ("sft", "dpo"):
        trials = _children(runs, stages[stage].info.run_id)
        total = sum(r.data.metrics["cpu_hours"] for r in trials)
        train = sum(r.data.metrics["cpu_hours/train"] for r in trials)
        dev = sum(r.data.metrics["cpu_hours/dev_eval"] for r in trials)
        assert train + dev == pytest.approx(total) and 0 < dev < train  # dev scoring is timed apart
        entry = results["tasks"]["uti"]["stages"][stage]
        by = {part: h["cpu_hours"] for part, h in entry["hours_by"].items()}
        assert by["train"] == pytest.approx(train) and by["dev_eval"] == pytest.approx(dev)
        assert by["test_eval"] > 0  # the test scoring is counted
        assert ("reference" in by and by["reference"] > 0) == (stage == "dpo")  # so is DPO's reference pass
        assert entry["cpu_hours"] == pytest.approx(sum(by.values()))
        assert stages[stage].data.metrics["cpu_hours"] == pytest.approx(entry["cpu_hours"])
        assert stages[stage].data.metrics["cpu_hours/train"] == pytest.approx(train)
    assert results["tasks"]["uti"]["stages"]["base"]["hours_by"]["test_eval"]["cpu_hours"] > 0
    assert task_run.data.metrics["dpo_sft_cost_ratio"] == pytest.approx(
        stages["dpo"].data.metrics["cpu_hours"] / stages["sft"].data.metrics["cpu_hours"])
    assert task_run.data.metrics["dpo_sft_train_cost_ratio"] == pytest.approx(
        stages["dpo"].data.metrics["cpu_hours/train"] / stages["sft"].data.metrics["cpu_hours/train"])
    assert task_run.data.params["data.test.rows"] == "200" and len(task_run.data.params["data.test.sha256"]) == 64


def test_selected_sft_is_best_on_dev_in_mlflow(demo):
    _, results, _, client, runs = demo
    _, stages = _stage_runs(runs, results)
    best = []
    for r in _children(runs, stages["sft"].info.run_id):
        for h in client.get_metric_history(r.info.run_id, "dev/f1"):
            best.append((-h.value, h.step, r.info.run_id))
    top = min(best)
    sel = results["tasks"]["uti"]["stages"]["sft"]["selected"]
    assert (sel["mlflow_run_id"], sel["step"]) == (top[2], top[1])
    assert results["tasks"]["uti"]["stages"]["sft"]["dev"]["f1"] == pytest.approx(-top[0])


def test_dpo_starts_from_selected_sft_and_weights_change(demo):
    import torch
    from safetensors.torch import load_file

    _, results, out, _, _ = demo
    st = results["tasks"]["uti"]["stages"]
    sft_ckpt, dpo_ckpt = Path(st["sft"]["checkpoint"]), Path(st["dpo"]["checkpoint"])
    assert read_manifest(sft_ckpt)["step"] == st["sft"]["selected"]["step"]
    assert read_manifest(sft_ckpt)["init_from"] is None
    assert read_manifest(dpo_ckpt)["init_from"] == str(sft_ckpt)
    assert read_manifest(dpo_ckpt)["step"] == st["dpo"]["selected"]["step"]
    base, sft, dpo = (load_file(p / "model.safetensors") for p in (out / "model", sft_ckpt, dpo_ckpt))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], sft[key])
    assert not torch.equal(sft[key], dpo[key])


def test_artifacts_stay_in_the_output_dir(demo):
    _, results, out, client, _ = demo
    names = {a.path for a in client.list_artifacts(results["mlflow"]["study_run_id"])}
    assert {"results.json", "report.md", "outcomes.jsonl"} <= names
    location = client.get_experiment(results["mlflow"]["experiment_id"]).artifact_location
    assert location == (out / "mlartifacts").resolve().as_uri()
    assert (out / "mlartifacts").is_dir()
    assert not (out / "examples").exists()  # no answers are logged unless mlflow.log_examples opts in


def test_device_hours_add_up_to_the_time_runs_and_ray_tasks_held(demo, ray_session):
    """The accounting against what MLflow and Ray themselves recorded: each trial's hours are its
    run's start-to-end time on its CPUs, and every Ray task of the study that held a device (the test
    scoring of base, SFT and DPO, DPO's reference pass) is in the stages' hours with the time Ray saw
    it run: at least Ray's RUNNING-to-FINISHED time, and the worker's start on top (the driver times
    each task from submission to result, while its lease holds the devices)."""
    from ray.util.state import list_tasks

    study, results, _, _, runs = demo
    study_run = runs[results["mlflow"]["study_run_id"]]
    t0, t1 = study_run.info.start_time, study_run.info.end_time
    _, stages = _stage_runs(runs, results)
    cpus = study.config.resources.cpus_per_trial
    for stage in ("sft", "dpo"):
        for r in _children(runs, stages[stage].info.run_id):
            held = (r.info.end_time - r.info.start_time) / 1000
            assert r.data.metrics["wall_s"] == pytest.approx(held, rel=0.05, abs=3.0), r.info.run_name
            assert r.data.metrics["cpu_hours"] == pytest.approx(cpus * r.data.metrics["wall_s"] / 3600)

    address = ray_session.get_runtime_context().gcs_address  # the session's Ray (ray.init, not ray start)
    tasks = [t for t in list_tasks(address, filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10_000)
             if t.start_time_ms and t.end_time_ms and t0 <= t.start_time_ms <= t.end_time_ms <= t1
             and t.required_resources]
    kinds = sorted(t.func_or_class_name.rsplit(".", 1)[-1] for t in tasks)
    assert kinds == ["_reference_task", "_score_task", "_score_task", "_score_task"], kinds
    stage_hours = results["tasks"]["uti"]["stages"]
    accounted = sum(stage_hours[s]["hours_by"][part]["cpu_hours"] for s, part in
                    [("base", "test_eval"), ("sft", "test_eval"), ("dpo", "test_eval"), ("dpo", "reference")])
    ray_seen = sum(t.required_resources.get("CPU", 0) * (t.end_time_ms - t.start_time_ms) / 3.6e6 for t in tasks)
    print(f"Ray tasks: {ray_seen * 3600:.1f} CPU-s as Ray saw them, {accounted * 3600:.1f} accounted")
    assert ray_seen * 0.98 <= accounted <= ray_seen * 1.1 + 20 * len(tasks) / 3600


def test_runs_say_their_level_and_the_datasets_they_used(demo):
    """Every run carries `clinft.level`; the experiment opens in MLflow 3's model view; the task run,
    each stage run and each trial list the splits they used as MLflow dataset inputs, by fingerprint
    and row count (never a row), with the split as the input's context."""
    import hashlib

    study, results, out, client, runs = demo
    experiment = client.get_experiment(results["mlflow"]["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    task_run, stages = _stage_runs(runs, results)
    levels = {r.data.tags["clinft.level"] for r in runs.values()}
    assert levels == {"study", "task", "stage", "trial"}
    assert {r.data.tags["clinft.level"] for r in stages.values()} == {"stage"}

    def inputs(run):
        got = client.get_run(run.info.run_id).inputs.dataset_inputs
        return {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]: d.dataset for d in got}

    train = study.config.tasks[0].splits.train
    sha = hashlib.sha256(Path(train).read_bytes()).hexdigest()
    task_inputs = inputs(task_run)
    assert set(task_inputs) == {"train", "eval", "dev", "test"}
    assert task_inputs["train"].name == "uti/train" and task_inputs["train"].digest == sha[:32]
    assert json.loads(task_inputs["train"].profile) == {"num_rows": len(Path(train).read_text().splitlines()),
                                                        "sha256": sha}
    assert set(inputs(stages["base"])) == {"dev", "test"} and set(inputs(stages["sft"])) == set(task_inputs)
    trial = _children(runs, stages["dpo"].info.run_id)[0]
    assert set(inputs(trial)) == {"train", "eval", "dev"}  # a trial never sees test
