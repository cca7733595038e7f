"""The study's outputs: `results.json`, `outcomes.jsonl`, `report.md` and `report.html`.

`outcomes.jsonl` holds one line per test example per stage (task, stage, example id, and the
example's outcomes: `correct`, `correct_<label set>` or `score`; and where the prediction is not free
text, the predicted and gold label or option letter: `pred` / `gold`, `pred_<label set>` /
`gold_<label set>`, None where the answer gave none) and nothing else: no prompt, answer or generated
text. `report.md` holds the tables to paste into a paper: per task and outcome, the test metric of
base / SFT / DPO with the paired p-values, the effect sizes with their 95% CIs, the clinical metrics
(sensitivity, specificity, PPV, NPV) of label tasks, every test metric with the answers that could not
be read, the selections, and the cost of each stage.
`report.html` is the same with the figures embedded (one file that opens correctly when copied
alone) and what produced it: versions, seeds, data fingerprints, the selection rule.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from clinft_ray.analysis import HOUR_PARTS, STAGES, part_hours

STAGE_NAMES = {"base": "base", "sft": "SFT", "dpo": "DPO"}
Table = tuple[list[str], list[list[str]]]


def _p(c: dict[str, Any]) -> str:
    return f"{c['p_value']:.3g}{'*' if c['significant'] else ''}"


def results_rows(results: dict[str, Any]) -> Table:
    """Per task and outcome: the test metric per stage and the paired p-values (* = significant).
    McNemar tests per-example correctness, so its column says it is a test of accuracy, and the
    accuracy per stage is shown beside an F1."""
    head = ["task", "metric", "base", "SFT", "DPO", "test", "p base-SFT", "p SFT-DPO", "p base-DPO"]
    rows = []
    for name, t in results["tasks"].items():
        for outcome, m in t["outcomes"].items():
            comps = [c for c in t["comparisons"] if c["outcome"] == outcome]
            mcnemar = comps[0]["test"].startswith("mcnemar")
            acc = "accuracy" + outcome[len("correct"):]
            beside = mcnemar and m != acc and acc in t["stages"]["base"]["test"]
            family = "McNemar (of accuracy)" if mcnemar else "paired t"
            cells = [f"{t['stages'][s]['test'][m]:.3f}" + (f" (acc {t['stages'][s]['test'][acc]:.3f})" if beside else "")
                     for s in STAGES]
            rows.append([name, m, *cells, family, *(_p(c) for c in comps)])
    return head, rows


def _ci(ci: list[float] | None, fmt: str = ".3f") -> str:
    return "n/a" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else f"{x:{fmt}}"


def effect_rows(results: dict[str, Any]) -> Table:
    """Per task, outcome and pair (A-B): the test's effect with its 95% CI (McNemar: discordant b, c
    and the odds ratio b/c; t-test: mean difference and d_z), the paired bootstrap difference of
    each metric with its 95% CI, and the raw and adjusted p."""
    head = ["task", "outcome", "pair (A-B)", "effect [95% CI]", "bootstrap A-B [95% CI]", "p", "p adjusted"]
    rows = []
    for name, t in results["tasks"].items():
        for c in t["comparisons"]:
            if c["test"].startswith("mcnemar"):
                effect = (f"b={c['discordant_b']}, c={c['discordant_c']}, OR b/c {c['odds_ratio']:.2f} {_ci(c['odds_ratio_ci'], '.2f')}"
                          + (" (Haldane +0.5)" if c["odds_ratio_method"].endswith("haldane") else ""))
            else:
                effect = f"mean diff {_num(c['mean_diff'])} {_ci(c['mean_diff_ci'])}, d_z {_num(c['d_z'], '.2f')}"
            boot = "; ".join(f"{k} {v['diff']:+.3f} {_ci(v['ci'])}" for k, v in c["bootstrap"].items())
            rows.append([name, c["outcome"], f"{STAGE_NAMES[c['a']]}-{STAGE_NAMES[c['b']]}", effect, boot,
                         f"{c['p_value']:.3g}", f"{c['p_adjusted']:.3g}{'*' if c['significant'] else ''}"])
    return head, rows


def clinical_rows(results: dict[str, Any]) -> Table:
    """Per task, stage and label: sensitivity, specificity, PPV, NPV with 95% Wilson CIs, and the
    confusion counts (TP, FP, FN, TN; an unparseable answer counts as a negative prediction)."""
    head = ["task", "stage", "outcome", "label", "sensitivity", "specificity", "PPV", "NPV", "TP/FP/FN/TN"]
    rows = []
    for name, t in results["tasks"].items():
        for s, by_outcome in t.get("clinical", {}).items():
            for outcome, cm in by_outcome.items():
                for label, v in cm["per_label"].items():
                    cells = [f"{_num(v[k]['value'])} {_ci(v[k]['ci'])}" for k in ("sensitivity", "specificity", "ppv", "npv")]
                    rows.append([name, STAGE_NAMES[s], outcome, label, *cells, f"{v['tp']}/{v['fp']}/{v['fn']}/{v['tn']}"])
                if "macro" in cm:
                    rows.append([name, STAGE_NAMES[s], outcome, "macro", *(_num(cm["macro"][k]) for k in
                                                                          ("sensitivity", "specificity", "ppv", "npv")), ""])
    return head, rows


UNPARSED = ("unparsed", "unparsed_rate")


def metrics_rows(results: dict[str, Any]) -> Table:
    """Every test metric of every stage (accuracy beside F1, ROUGE-L beside the judge; the compared
    metric with its 95% bootstrap CI), and how many of its test answers could not be read ("-" for results written before that was counted)."""
    rows = []
    for name, t in results["tasks"].items():
        for s in STAGES:
            test, cis = t["stages"][s]["test"], t["stages"][s].get("test_ci") or {}
            shown = ", ".join(f"{k} {v:.3f}" + (f" {_ci(cis[k]['ci'])}" if cis.get(k) else "")
                              for k, v in test.items() if k not in UNPARSED)
            unread = f"{int(test['unparsed'])} / {t['n_test']}" if "unparsed" in test else "-"
            rows.append([name, s, shown, unread])
    return ["task", "stage", "metrics on test", "unparsed"], rows


def selection_rows(results: dict[str, Any]) -> Table:
    rows = []
    for name, t in results["tasks"].items():
        for s in ("sft", "dpo"):
            sel = t["stages"][s]["selected"]
            hp = ", ".join(f"{k}={sel[k]:g}" for k in ("learning_rate", "beta") if k in sel)
            rows.append([name, s, hp, str(sel["step"]), f"{t['stages'][s]['dev'][t['metric']]:.3f}"])
    return ["task", "stage", "selected", "step", "dev"], rows


def cost_rows(results: dict[str, Any]) -> Table:
    """Trials, device-hours and cost per stage, and the device-hours split by what they paid for
    (training; dev scoring inside the trials; DPO's reference pass; test scoring) in the task's cost basis."""
    rows = []
    for name, t in results["tasks"].items():
        unit = t["cost_basis"]
        for s in STAGES:
            st = t["stages"][s]
            parts = [part_hours(st, p, unit) for p in HOUR_PARTS]
            split = " / ".join(f"{h:.4f}" for h in parts) if parts[0] is not None else "n/a"
            rows.append([name, s, str(st["trials"]), f"{st['gpu_hours']:.4f}", f"{st['cpu_hours']:.4f}", split,
                         _usd(st["cost_usd"])])
    head = " / ".join(p.replace("_", " ") for p in HOUR_PARTS)
    return ["task", "stage", "trials", "GPU-hours", "CPU-hours", head, "cost (USD)"], rows


def _usd(x: float) -> str:
    return f"{x:.2f}" if x >= 1 or x == 0 else f"{x:.4f}"


def cost_ratios(results: dict[str, Any]) -> list[str]:
    out = []
    for name, t in results["tasks"].items():
        if t["dpo_sft_cost_ratio"] is None:
            continue
        train = t.get("dpo_sft_train_cost_ratio")
        out.append(f"{name}: DPO/SFT cost = {t['dpo_sft_cost_ratio']:.2f}x ({t['cost_basis'].replace('_', '-')}, "
                   "everything each stage ran)" + (f"; {train:.2f}x for training alone" if train is not None else ""))
    return out


def markdown(table: Table) -> str:
    head, rows = table
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def html_table(table: Table) -> str:
    head, rows = table
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def results_table(results: dict[str, Any]) -> str:
    return markdown(results_rows(results))


def _caption(results: dict[str, Any]) -> str:
    boot = results["bootstrap"]
    return (f"Paired tests on test outcomes (McNemar on per-example correctness, i.e. of accuracy; paired t for "
            f"scores). {results['multiple_comparisons']['footnote']} Effects are A minus B; odds ratio b/c > 1: A "
            f"right more often. Bootstrap: {boot['n_resamples']} resamples of the test examples, jointly across "
            f"stages (seed {boot['seed']}), BCa 95% CI.")


def render_report(results: dict[str, Any]) -> str:
    parts = [
        f"# {results['study']}: base vs SFT vs DPO on test",
        results_table(results),
        _caption(results),
        markdown(metrics_rows(results)),
        "## Effect sizes",
        markdown(effect_rows(results)),
    ]
    if clinical_rows(results)[1]:
        parts += ["## Clinical metrics (95% Wilson CIs)", markdown(clinical_rows(results))]
    return "\n\n".join(parts + [
        "## Selected on dev",
        markdown(selection_rows(results)),
        "## Cost",
        markdown(cost_rows(results)),
        "\n".join(f"- {r}" for r in cost_ratios(results)),
        "",
    ])


LIBRARIES = ("clinft-ray", "torch", "transformers", "trl", "peft", "ray", "mlflow", "scipy")
SELECTION_RULE = ("per stage, the trial and eval step with the best dev metric among whole checkpoints; ties go "
                  "to fewer optimizer steps, then to the earlier point of the search space (selection.py)")


def installed(name: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """The versions of clinft-ray and the libraries that decide what a study trains and scores."""
    return {name: installed(name) for name in LIBRARIES}


def provenance_rows(results: dict[str, Any], made: str | None = None) -> Table:
    """What produced the report: study, model, date, versions (those the study ran with, where
    results.json records them), seeds, data fingerprints, selection rule."""
    cfg = results.get("config", {})
    model = cfg.get("model", {})
    rows = [["study", results.get("study", "")],
            ["model", f"{model.get('name_or_path', '')} ({model.get('finetune', '')}, {model.get('dtype', '')})"],
            ["made", made or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())],
            ["versions", ", ".join(f"{n} {v}" for n, v in (results.get("versions") or versions()).items())],
            ["seeds", f"training {cfg.get('seed', '')}, bootstrap {cfg.get('stats', {}).get('seed', '')}"],
            ["study fingerprint", results.get("fingerprint", "")],
            ["selection", SELECTION_RULE]]
    for task in results.get("fingerprint_inputs", {}).get("tasks", []):
        for split, sha in task.get("splits", {}).items():
            rows.append([f"data {task['name']}/{split} sha256", sha])
    return ["", ""], rows


def _embedded(figure: Path) -> str:
    """A figure as an `<img>` whose image is in the page itself (a data: URI), so the file travels alone."""
    data = base64.b64encode(Path(figure).read_bytes()).decode("ascii")
    kind = "svg+xml" if Path(figure).suffix == ".svg" else "png"
    return (f'<figure><img src="data:image/{kind};base64,{data}" alt="{html.escape(Path(figure).stem)}">'
            f"<figcaption>{html.escape(Path(figure).name)}</figcaption></figure>")


def render_html(results: dict[str, Any], figures: list[Path], made: str | None = None) -> str:
    """One self-contained page: the tables, the figures embedded, and what produced it (`made`: the
    date to print; now by default)."""
    imgs = "".join(_embedded(f) for f in figures)
    ratios = "".join(f"<li>{html.escape(r)}</li>" for r in cost_ratios(results))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}"
             "figcaption{color:#555;font-size:90%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(results['study'])}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(results['study'])}: base vs SFT vs DPO on test</h1>"
            f"{html_table(results_rows(results))}<p>{html.escape(_caption(results))}</p>"
            f"{html_table(metrics_rows(results))}<h2>Effect sizes</h2>{html_table(effect_rows(results))}"
            f"<h2>Clinical metrics (95% Wilson CIs)</h2>{html_table(clinical_rows(results))}<h2>Selected on dev</h2>{html_table(selection_rows(results))}"
            f"<h2>Cost</h2>{html_table(cost_rows(results))}<ul>{ratios}</ul><h2>Figures</h2>{imgs}"
            f"<h2>How this report was made</h2>{html_table(provenance_rows(results, made))}</body></html>")


def write_outputs(out_dir: Path, results: dict[str, Any], outcomes: list[dict[str, Any]],
                  figures: list[Path]) -> list[Path]:
    """Write results.json, outcomes.jsonl, report.md and report.html into `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths = [out / "results.json", out / "outcomes.jsonl", out / "report.md", out / "report.html"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    paths[1].write_text("".join(json.dumps(o) + "\n" for o in outcomes))
    paths[2].write_text(render_report(results))
    paths[3].write_text(render_html(results, [f for f in figures if f.suffix == ".png"]))
    return paths
