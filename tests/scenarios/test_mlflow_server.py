"""Scenario: one LoRA study logged over HTTP to the session's real `mlflow server` on 127.0.0.1 (sqlite
backend, artifacts stored by the server), with a 30 s outage in the middle of its SFT sweep, read back
through the MLflow client:

- nothing lost: training goes on through the outage and every value is in MLflow afterwards, once;
- cost at every level, figures and reports as artifacts, no run left RUNNING;
- the LoRA path: SFT adapters, DPO adapters stacked on the selected SFT adapter (reference = adapter
  disabled), checkpoints that load back as one merged model; example answers logged because the study
  opts in (`mlflow.log_examples`);
- the canary scan: planted patient text (in every split's prompts) and a secret in the environment
  appear nowhere in what MLflow, the run directory or Ray's logs hold.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from clinft_ray.config import load_study
from clinft_ray.modeling import load_model, read_manifest
from clinft_ray.study import run_study

from helpers import clinft_in_process, small_study
from helpers.browser import browser_page, screenshot
from helpers.exported import fresh_logits, holds_no_training_state_or_rows, probe, scored_logits

pytestmark = pytest.mark.slow

CANARY_TEXT = "CANARY-PHI-3317"
CANARY_SECRET = "canary-secret-8c41f"
SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e-2, 1.0e-4]}, "max_steps": 20, "eval_steps": 10,
       "batch_size": 8, "lr_scheduler": "constant"}
DPO = {"stage": "dpo", "learning_rate": {"grid": [1.0e-3]}, "beta": {"grid": [0.1, 0.5]}, "max_steps": 10,
       "eval_steps": 5, "batch_size": 8, "lr_scheduler": "constant"}
OUTAGE_S = 30


@pytest.fixture(scope="module")
def served(mlflow_server, demo_dir, tmp_path_factory, ray_session):
    """The study, run in a thread while the test cuts the server's link for 30 s once the first SFT
    curve point is in MLflow: its output folder, the server's root, results, client, the outage's start
    and end, and the study."""
    out = tmp_path_factory.mktemp("served")
    config = small_study(demo_dir, out, sft=SFT, dpo=DPO)
    for path in (out / "data" / "classification-small").glob("*.jsonl"):  # patient text stand-ins in every split
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            r["prompt"] = r["prompt"].replace("Urinalysis", f"{CANARY_TEXT} urinalysis")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(out / "data" / "classification")  # the untrimmed splits: the study does not read them
    sets = [f"mlflow.tracking_uri={mlflow_server.url}", "study=served", "cost.gpu_hour_usd=2.5",
            "cost.cpu_hour_usd=0.05", "model.finetune=lora", "model.lora.r=8", "mlflow.log_examples=3"]
    study = load_study(config, sets)
    results: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(run_study(study))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    os.environ["CLINFT_TEST_TOKEN"] = CANARY_SECRET  # a secret in the environment must never be logged
    driver = threading.Thread(target=run, daemon=True)
    driver.start()
    client = MlflowClient(mlflow_server.url)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not errors:  # the first SFT curve point is in: pull the plug
            experiment = client.get_experiment_by_name("served")
            runs = client.search_runs([experiment.experiment_id], "tags.clinft.stage = 'sft'") if experiment else []
            if any("eval/loss" in r.data.metrics and "clinft.trial" in r.data.tags for r in runs):
                break
            time.sleep(0.5)
        mlflow_server.outage()
        down = time.time()
        time.sleep(OUTAGE_S)
        up = time.time()
        mlflow_server.back()
        driver.join(timeout=900)
    finally:
        mlflow_server.back()
        os.environ.pop("CLINFT_TEST_TOKEN")
    assert not driver.is_alive() and not errors, errors
    return SimpleNamespace(out=out, root=mlflow_server.root, results=results[0], client=client, down=down, up=up,
                           study=study)


@pytest.fixture(scope="module")
def server_run(served):
    return served.out, served.root, served.results, served.client


@pytest.fixture(scope="module")
def lora_run(served):
    return served.study, served.results


def test_a_study_trains_through_a_30_s_outage_and_mlflow_ends_complete(served):
    _check_complete(served.client, served.results, served.out, served.down, served.up)


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
    stems = ("uti_test", "uti_sft_sweep", "uti_dpo_sweep", "cost")
    assert figs == {f"{stem}.{ext}" for stem in stems for ext in ("png", "svg")}  # each also as vector
    for f in figs:
        head = (out / "figures" / f).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" if f.endswith(".png") else head.startswith(b"<?xml")
    # the sweep figure draws what selection read: every trial's dev curve, from the study itself
    progress = json.loads((out / "progress.json").read_text())
    sweep = progress["done"]["uti/dpo"]["sweep"]
    assert len(sweep["curves"]) == results["tasks"]["uti"]["stages"]["dpo"]["trials"]
    chosen = sweep["curves"][sweep["selected_trial"]]
    assert [sweep["selected"]["step"], results["tasks"]["uti"]["stages"]["dpo"]["dev"]["f1"]] in chosen["dev"]
    assert set(chosen["hparams"]) == {"learning_rate", "beta"}
    assert any(root.joinpath("artifacts").rglob("uti_test.png"))  # stored by the server, not locally
    html = (out / "report.html").read_text()
    assert "<table" in html and 'alt="uti_test"' in html and "data:image/png;base64," in html
    assert 'src="figures/' not in html  # nothing it needs lies beside it


def _scan(paths: list[Path], needles: list[bytes]) -> list[str]:
    hits = []
    for base in paths:
        for f in [base] if base.is_file() else base.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                hits += [f"{f}: {n.decode()}" for n in needles if n in data]
    return hits


def test_report_html_copied_alone_shows_every_figure_in_a_browser(server_run, tmp_path):
    out, _, results, _ = server_run
    alone = tmp_path / "sent-by-mail"
    alone.mkdir()
    shutil.copy(out / "report.html", alone / "report.html")  # nothing beside it
    with browser_page() as page:
        page.goto((alone / "report.html").as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        text = page.inner_text("body")
        screenshot(page, "report-html", tmp_path)
    pngs = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert sorted(alt for alt, _, _ in images) == pngs
    assert all(done and width > 0 for _, done, width in images), images  # each decoded, none broken
    for said in ("How this report was made", "Selected on dev", results["study"]):
        assert said in text


def test_the_readme_mlflow_walkthrough_in_a_browser(server_run, mlflow_server, tmp_path):
    """What the README's "Comparing runs in the MLflow UI" tells a user to do, in the MLflow UI of the
    version we install: the experiment in the model-training view, the cost filter (typed into the
    search box, the task run expanded: its SFT and DPO stage runs, not base), and the compare view of
    the two stage runs."""
    import re
    import urllib.parse

    from helpers import REPO

    _, _, results, client = server_run
    readme = (REPO / "README.md").read_text()
    [view] = re.findall(r"`(#/experiments/<id>\?[^`]+)`", readme)
    cost_filter = next(f for f in re.findall(r"`(tags\.clinft\.[^`]+)`", readme) if "!=" in f)
    exp = results["mlflow"]["experiment_id"]
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([exp], "tags.clinft.level = 'stage'")}
    with browser_page() as page:
        name_cells = page.locator('[role=gridcell][col-id="attributes.`Run Name`"]')  # the runs table's names
        page.goto(f"{mlflow_server.url}/{view.replace('<id>', exp)}")
        page.get_by_text("matching runs").wait_for()
        name_cells.get_by_role("link", name=results["study"], exact=True).wait_for()  # the study run
        assert "No data available" not in page.inner_text("body")  # not the GenAI overview
        screenshot(page, "mlflow-experiment", tmp_path)

        search = page.locator('input[placeholder*="metrics."]')  # the runs table's search box, as a user types
        search.fill(cost_filter)
        search.press("Enter")
        task = page.get_by_role("link", name="uti", exact=True)
        name_cells.get_by_role("link", name="uti", exact=True).wait_for()
        name_cells.filter(has=task).locator("button").first.click()  # expand the task run
        name_cells.get_by_role("link", name="sft", exact=True).wait_for()
        shown = set(name_cells.locator("a").all_inner_texts())
        assert shown == {"uti", "sft", "dpo"}, shown  # the parent, and the two stages the filter selects
        screenshot(page, "mlflow-cost-filter", tmp_path)

        ids = urllib.parse.quote(json.dumps([runs["sft"], runs["dpo"]]))
        page.goto(f"{mlflow_server.url}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp]))}"
                  "&workflowType=machine_learning")
        page.get_by_text("gpu_hours/train").first.wait_for()
        text = page.inner_text("body")
        screenshot(page, "mlflow-compare-stages", tmp_path)
    for said in ("cost_usd", "gpu_hours", "cpu_hours/dev_eval", "gpu_hours/reference", "dev/f1", "test/accuracy",
                 "selected.learning_rate", "clinft.selected_run_id"):
        assert said in text, said


def test_canaries_reach_nothing(server_run):
    out, root, results, _ = server_run
    needles = [CANARY_TEXT.encode(), CANARY_SECRET.encode()]
    outputs = [p for p in out.iterdir() if p.name != "data"]  # the input data is the user's own
    ray_logs = Path("/tmp/ray/session_latest/logs")
    assert _scan([out / "data"], needles[:1])  # the scan finds the canary where it really is
    hits = _scan([root, *outputs] + ([ray_logs] if ray_logs.exists() else []), needles)
    assert hits == []


def test_lora_checkpoints_chain_and_load(lora_run):
    import torch
    from transformers import AutoModelForCausalLM

    study, results = lora_run
    st = results["tasks"]["uti"]["stages"]
    assert st["sft"]["trials"] == 2 and st["dpo"]["trials"] == 2
    sft_ckpt, dpo_ckpt = st["sft"]["checkpoint"], st["dpo"]["checkpoint"]
    sft_m, dpo_m = read_manifest(Path(sft_ckpt)), read_manifest(Path(dpo_ckpt))
    assert sft_m["finetune"] == dpo_m["finetune"] == "lora"
    assert sft_m["parent"] is None and dpo_m["parent"] == sft_ckpt == dpo_m["init_from"]
    for ckpt in (sft_ckpt, dpo_ckpt):
        assert (Path(ckpt) / "adapter_model.safetensors").is_file()

    for ckpt in (sft_ckpt, dpo_ckpt):  # each holds its own adapter only; the DPO one stacks on its parent
        assert not list(Path(ckpt).glob("clinft_stacked_*")) and not (Path(ckpt) / "ref").exists()

    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    base = logits(AutoModelForCausalLM.from_pretrained(study.config.model.name_or_path))
    sft, dpo = (logits(load_model(study.config.model, c)) for c in (sft_ckpt, dpo_ckpt))
    assert not torch.equal(base, sft) and not torch.equal(sft, dpo)


@pytest.fixture(scope="module")
def lora_probe(lora_run):
    """Token ids of four test prompts as the chat template renders them, and every split's prompts."""
    from clinft_ray.modeling import load_tokenizer
    from clinft_ray.tasks import load_task_split

    study, _ = lora_run
    rows = [e for s in ("train", "eval", "dev", "test") for e in load_task_split(study.config.tasks[0], s)]
    return probe(load_tokenizer(study.config.model), [e.prompt for e in rows[-4:]]), [e.prompt for e in rows]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_lora_exports_are_the_scored_chain_merged_or_as_one_adapter(lora_run, lora_probe, stage, tmp_path, capsys):
    """Merged: transformers alone loads it; adapter: PEFT on the base; both in a fresh process, both
    with the logits of the chain clinft-ray scored (for DPO: base + SFT adapter + DPO adapter, rank
    8 + 8), neither with training state or a row's text."""
    study, results = lora_run
    ids, prompts = lora_probe
    entry = results["tasks"]["uti"]["stages"][stage]
    want = scored_logits(study.config.model, entry["checkpoint"], ids)
    base = study.config.model.name_or_path
    for fmt in ("merged", "adapter"):
        code, errors, text = clinft_in_process(capsys, "export", str(study.config.output_dir), "--stage", stage,
                                               "--format", fmt, "--to", str(tmp_path / fmt))
        assert code == 0 and not errors, text
        holds_no_training_state_or_rows(tmp_path / fmt, [CANARY_TEXT, *prompts])
    merged, adapter = fresh_logits([(tmp_path / "merged", None), (tmp_path / "adapter", base)], ids, tmp_path)
    assert float((merged - want).abs().max()) <= 1e-5 and float((adapter - want).abs().max()) <= 1e-5
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == (16 if stage == "dpo" else 8) and adapter["base_model_name_or_path"] == base
    assert "--lora-modules" in text and f"rank {adapter['r']}" in (tmp_path / "adapter" / "MODEL_CARD.md").read_text()
    sft_alone = scored_logits(study.config.model, results["tasks"]["uti"]["stages"]["sft"]["checkpoint"], ids)
    if stage == "dpo":  # what loading the DPO checkpoint's folder alone would have missed
        assert float((sft_alone - want).abs().max()) > 1e-4


def test_the_registry_on_the_server_holds_both_stages_and_they_load_as_scored(server_run, lora_run, lora_probe,
                                                                              mlflow_server, tmp_path, capsys):
    """Each stage's selected model registered on the real server as served-uti, aliases sft and dpo,
    with its tags and dev/test metrics; the registered adapter, downloaded and loaded with PEFT in a
    fresh process, and `clinft export models:/served-uti@dpo`, both give the scored logits."""
    import mlflow.artifacts

    out, _, results, client = server_run
    study, _ = lora_run
    ids, _ = lora_probe
    loads, wants = [], []
    for stage in ("sft", "dpo"):
        entry = results["tasks"]["uti"]["stages"][stage]
        version = client.get_model_version_by_alias("served-uti", stage)
        assert version.aliases == [stage]
        run = client.get_run(version.run_id).data.tags  # the stage's run, whose metrics these are
        assert (run["clinft.level"], run["clinft.stage"]) == ("stage", stage)
        assert version.tags["clinft.format"] == "adapter" and version.tags["clinft.checkpoint"] == entry["checkpoint"]
        assert version.tags["clinft.fingerprint"] == results["fingerprint"]
        model = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
        metrics = {m.key: m.value for m in model.metrics}
        assert metrics["test/f1"] == pytest.approx(entry["test"]["f1"]) and "dev/f1" in metrics
        assert model.params["learning_rate"] == str(entry["selected"]["learning_rate"])
        files = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                         dst_path=str(tmp_path / stage), tracking_uri=mlflow_server.url))
        assert {"adapter_config.json", "adapter_model.safetensors", "MODEL_CARD.md"} <= {p.name for p in files.iterdir()}
        loads.append((files, study.config.model.name_or_path))
        wants.append(scored_logits(study.config.model, entry["checkpoint"], ids))
    exported = tmp_path / "exported"
    code, errors, text = clinft_in_process(capsys, "export", "models:/served-uti@dpo", "--tracking-uri",
                                           mlflow_server.url, "--to", str(exported))
    assert code == 0 and not errors, text
    got = fresh_logits([*loads, (exported, None)], ids, tmp_path)
    for g, w in zip(got, [*wants, wants[-1]], strict=True):
        assert float((g - w).abs().max()) <= 1e-5


def test_lora_results_have_scores_and_costs(lora_run):
    _, results = lora_run
    t = results["tasks"]["uti"]
    for stage in ("base", "sft", "dpo"):
        assert 0.0 <= t["stages"][stage]["test"]["f1"] <= 1.0
        assert t["stages"][stage]["cpu_hours"] > 0
    assert [(c["a"], c["b"]) for c in t["comparisons"]] == [("base", "sft"), ("sft", "dpo"), ("base", "dpo")]
    assert t["dpo_sft_cost_ratio"] > 0


def test_example_answers_logged_only_when_opted_in(lora_run):
    study, results = lora_run
    for stage in ("base", "sft", "dpo"):
        rows = [json.loads(line) for line in (study.config.output_dir / "examples" / f"uti_{stage}.jsonl")
                .read_text().splitlines()]
        assert len(rows) == 3 and set(rows[0]) == {"id", "gold", "answer"}
        assert rows[0]["answer"] in ("UTI", "pyuria")


def _check_complete(client: MlflowClient, results: dict, out: Path, down: float, up: float) -> None:
    runs = client.search_runs([results["mlflow"]["experiment_id"]], max_results=1000)
    assert {r.info.status for r in runs} == {"FINISHED"}
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 2 + 2 and len({r.data.tags["clinft.trial_id"] for r in trials}) == 4
    reported = {}  # Tune trial id -> the rows the trial reported, as Tune stored them
    for path in out.glob("ray/*/*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        reported[rows[0]["trial_id"]] = rows
    reported_during_outage = 0
    for run in trials:
        rows = reported[run.data.tags["clinft.trial_id"]]
        reported_during_outage += sum(down < row["timestamp"] < up for row in rows)
        for key in ("eval/loss", "dev/f1"):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            expected = [(row["step"], row[key]) for row in rows if key in row]
            # Steps must match exactly (each point once); values only to float precision, since MLflow
            # stores doubles that went through JSON.
            assert [step for step, _ in logged] == [step for step, _ in expected], (run.info.run_name, key)
            assert [v for _, v in logged] == pytest.approx([v for _, v in expected]), (run.info.run_name, key)
        assert run.data.metrics["cpu_hours"] > 0
    assert reported_during_outage > 0  # trials trained and reported while MLflow was down
    stage_sft = [r for r in runs if r.data.tags.get("clinft.stage") == "sft" and "clinft.trial" not in r.data.tags]
    assert stage_sft[0].data.tags["clinft.selected_run_id"] in {r.info.run_id for r in trials}
