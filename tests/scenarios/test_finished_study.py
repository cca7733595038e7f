"""Scenario: the finished demo study (the shared `demo_run`) is not run again, a different study is not
written over it, and `clinft report` rebuilds it at a new alpha and price without training."""

from __future__ import annotations

import json
import shutil

import pytest

from clinft_ray.config import load_study
from clinft_ray.preflight import PreflightError

from helpers import clinft


def test_a_finished_study_is_not_run_again_and_another_one_is_not_overwritten(demo_run):
    from clinft_ray.study import finished, run_study, study_fingerprint

    study, results = demo_run
    stamp = (study.config.output_dir / "results.json").stat().st_mtime_ns
    assert run_study(study) == results
    assert (study.config.output_dir / "results.json").stat().st_mtime_ns == stamp  # not run again
    # where the study runs does not change what it is
    moved = load_study(study.source, ["ray.num_cpus=2", "resources.cpus_per_trial=2"])
    assert study_fingerprint(moved) == results["fingerprint"]
    # nor do the statistics and prices: `clinft report` redoes those
    reported = load_study(study.source, ["stats.alpha=0.01", "stats.correction=holm", "cost.gpu_hour_usd=3.1"])
    assert study_fingerprint(reported) == results["fingerprint"]
    other = load_study(study.source, ["seed=1", "model.max_length=200"])
    with pytest.raises(PreflightError, match=r"holds the finished study 'uti-demo' with another config or data "
                                             r"\(differing: model.max_length, seed\)"):
        finished(other, study_fingerprint(other))


@pytest.mark.slow
def test_report_rebuilds_a_finished_study_at_new_alpha_and_price_without_training(demo_run, tmp_path):
    """`clinft report` on a copy of the finished demo: the new alpha and price reach results.json,
    the reports, the figures and the MLflow study and task runs; no run is added, nothing trains."""
    from mlflow.tracking import MlflowClient

    study, before = demo_run
    out = tmp_path / "done"
    shutil.copytree(study.config.output_dir, out, ignore=shutil.ignore_patterns("ray", "data", "model"))
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs_before = {r.info.run_id for r in client.search_runs([before["mlflow"]["experiment_id"]], max_results=1000)}
    figure = out / "figures" / "uti_test.png"
    stamp = figure.stat().st_mtime_ns
    res = clinft("report", str(out), "--set", "stats.alpha=0.01", "--set", "cost.cpu_hour_usd=3.1",
                 "--set", "cost.gpu_hour_usd=3.1", "--set", f"mlflow.tracking_uri={uri}")
    assert res.returncode == 0, res.stderr
    # nothing is trained or scored: the copy has no model, data or Ray folder to do it with
    after = json.loads((out / "results.json").read_text())
    assert after["alpha"] == 0.01 and after["threshold"] == pytest.approx(0.01 / 1)
    assert after["fingerprint"] == before["fingerprint"]
    task = after["tasks"]["uti"]
    for c in task["comparisons"]:
        assert c["significant"] == (c["p_value"] < 0.01)
    for s in ("base", "sft", "dpo"):
        st = task["stages"][s]
        assert st["cost_usd"] == pytest.approx(st["cpu_hours"] * 3.1) and st["cost_usd"] > 0
        assert st["test"] == before["tasks"]["uti"]["stages"][s]["test"]  # scores are not redone
    assert after["totals"]["cost_usd"] == pytest.approx(sum(t["cost_usd"] for t in after["tasks"].values()))
    report = (out / "report.md").read_text()
    assert "alpha / m = 0.01 / 1 = 0.01" in report and "Effect sizes" in report and "sensitivity" in report
    assert figure.stat().st_mtime_ns > stamp
    runs = {r.info.run_id: r for r in client.search_runs([before["mlflow"]["experiment_id"]], max_results=1000)}
    assert set(runs) == runs_before  # no new trial (or any other) run
    study_run = runs[before["mlflow"]["study_run_id"]]
    assert study_run.data.metrics["stats/alpha"] == 0.01
    assert study_run.data.metrics["cost_usd"] == pytest.approx(after["totals"]["cost_usd"])
    task_run = [r for r in runs.values() if r.info.run_name == "uti"
                and r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id][0]
    assert task_run.data.metrics["cost_usd"] == pytest.approx(task["cost_usd"])
    assert "report.md" in {a.path for a in client.list_artifacts(study_run.info.run_id)}
    # a setting that changes training is refused, naming it
    res = clinft("report", str(out), "--set", "seed=7")
    assert res.returncode == 2 and "seed: would change what was trained" in res.stderr
