"""A small study logged over HTTP to a real `mlflow server` on 127.0.0.1 (sqlite backend, local
artifact folder), read back through the MLflow client: cost at every level, figures as artifacts,
no run left RUNNING. Then the canary scan: planted patient text and secrets appear nowhere in what
MLflow, the run directory or Ray's logs hold."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import MlflowServer
from mlflow.tracking import MlflowClient

from clinft_ray.config import load_study
from clinft_ray.study import run_study

pytestmark = pytest.mark.slow

CANARY_TEXT = "CANARY-PHI-3317"
CANARY_SECRET = "canary-secret-8c41f"
SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e-2, 1.0e-3]}, "max_steps": 10, "eval_steps": 5, "batch_size": 8}
DPO = {"stage": "dpo", "learning_rate": {"grid": [1.0e-3]}, "beta": {"grid": [0.1, 0.5]}, "max_steps": 4,
       "eval_steps": 2, "batch_size": 8}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root).start()
    yield server.url, root
    server.stop()


@pytest.fixture(scope="module")
def server_run(mlflow_server, demo_dir, tmp_path_factory, ray_session):
    url, root = mlflow_server
    out = tmp_path_factory.mktemp("served")
    shutil.copytree(demo_dir / "model", out / "model")
    src = demo_dir / "data" / "classification"
    (out / "data").mkdir()
    for split in ("train", "eval", "dev", "test"):  # patient text stand-ins in every split
        rows = [json.loads(line) for line in (src / f"{split}.jsonl").read_text().splitlines()]
        for r in rows:
            r["prompt"] = r["prompt"].replace("Urinalysis", f"{CANARY_TEXT} urinalysis")
        (out / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "sft.yaml").write_text(yaml.safe_dump(SFT))
    (out / "dpo.yaml").write_text(yaml.safe_dump(DPO))
    shutil.copyfile(demo_dir / "study.yaml", out / "study.yaml")
    sets = [f"mlflow.tracking_uri={url}", "study=served", "sft.space=sft.yaml", "dpo.space=dpo.yaml",
            "cost.gpu_hour_usd=2.5", "cost.cpu_hour_usd=0.05"] + [
            f"tasks.0.splits.{s}=data/{s}.jsonl" for s in ("train", "eval", "dev", "test")]
    os.environ["CLINFT_TEST_TOKEN"] = CANARY_SECRET  # a secret in the environment must never be logged
    try:
        study = load_study(out / "study.yaml", sets)
        results = run_study(study)
    finally:
        os.environ.pop("CLINFT_TEST_TOKEN")
    return out, root, results, MlflowClient(tracking_uri=url)


def test_runs_carry_cost_at_every_level(server_run):
    _, _, results, client = server_run
    runs = client.search_runs([results["mlflow"]["experiment_id"]], max_results=500)
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    by_kind = {}
    for r in runs:
        kind = r.data.tags.get("clinft.kind") or ("trial" if "clinft.trial" in r.data.tags else
                                                    "stage" if "clinft.stage" in r.data.tags else "task")
        by_kind.setdefault(kind, []).append(r)
    assert len(by_kind["trial"]) == 2 + 2 and len(by_kind["stage"]) == 3
    for r in by_kind["trial"] + by_kind["stage"] + by_kind["task"] + by_kind["study"]:
        m = r.data.metrics
        assert m["gpu_hours"] == 0.0 and m["cpu_hours"] > 0, r.info.run_name
        assert m["cost_usd"] == pytest.approx(0.05 * m["cpu_hours"] + 2.5 * m["gpu_hours"]), r.info.run_name
    task = by_kind["task"][0].data.metrics
    assert task["dpo_sft_cost_ratio"] == pytest.approx(task["dpo_cpu_hours"] / task["sft_cpu_hours"])
    assert results["tasks"]["uti"]["cost_usd"] == pytest.approx(task["cost_usd"])


def test_figures_and_reports_are_artifacts(server_run):
    out, root, results, client = server_run
    study_run = results["mlflow"]["study_run_id"]
    names = {a.path for a in client.list_artifacts(study_run)}
    assert {"results.json", "report.md", "report.html", "outcomes.jsonl", "figures"} <= names
    figs = {Path(a.path).name for a in client.list_artifacts(study_run, "figures")}
    assert {"uti_test.png", "uti_sft_eval_loss.png", "uti_dpo_eval_loss.png", "cost.png"} <= figs
    for f in figs:
        assert (out / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(root.joinpath("artifacts").rglob("uti_test.png"))  # stored by the server, not locally
    html = (out / "report.html").read_text()
    assert "<table" in html and "figures/uti_test.png" in html


def _scan(paths: list[Path], needles: list[bytes]) -> list[str]:
    hits = []
    for base in paths:
        for f in [base] if base.is_file() else base.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                hits += [f"{f}: {n.decode()}" for n in needles if n in data]
    return hits


def test_canaries_reach_nothing(server_run):
    out, root, results, _ = server_run
    needles = [CANARY_TEXT.encode(), CANARY_SECRET.encode()]
    outputs = [p for p in out.iterdir() if p.name != "data"]  # the input data is the user's own
    ray_logs = Path("/tmp/ray/session_latest/logs")
    assert _scan([out / "data"], needles[:1])  # the scan finds the canary where it really is
    hits = _scan([root, *outputs] + ([ray_logs] if ray_logs.exists() else []), needles)
    assert hits == []
