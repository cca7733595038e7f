"""Runs in the `clinft export` process (and on the driver at the end of a study, for the registry's
files): the model a finished study selected, out of the study as something a server loads.

What the study scored is not one folder. A full fine-tuning checkpoint is the whole model, beside its
optimizer state and Tune's files. A LoRA DPO checkpoint is an adapter trained on top of the selected
SFT adapter, which is trained on the base: its manifest names the SFT checkpoint as its `parent`, and
loading the DPO folder alone with PEFT or vLLM would silently serve base + DPO, a model nobody tested.

- `merged`: one plain Hugging Face folder (safetensors, config, generation config, the tokenizer with
  its chat template): full weights as trained, or the LoRA chain merged into the base in float32 (the
  adapters' deltas are below a bf16 step of the weights, see `modeling`, so merging in bf16 would
  drop them; `dtype` casts after the merge, and the check below says what that costs).
- `adapter` (LoRA): one PEFT adapter on the base equal to the whole chain. Adapters stacked on one
  base add up: sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2] [A_1; A_2], one adapter of rank r_1 + r_2 with
  scaling 1 (`combine_adapters`), for `vllm serve BASE --enable-lora --lora-modules ...`.

Every export is checked before it is kept: the exported folder, loaded as a server would load it
(transformers, or PEFT on the base), gives the logits of the model clinft-ray scored on a probe of
seeded random token ids (no text), and the largest difference is written into `clinft_export.json`
and `MODEL_CARD.md` (`model_card`), which say what was trained on what (fingerprints and row counts,
never text), how it was selected and how it scored.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinft_ray.config import ModelConfig
from clinft_ray.errors import PreflightError, StudyError
from clinft_ray.modeling import STACKED, device, load_model, load_tokenizer, local_checkpoint, lora_chain

log = logging.getLogger("clinft")
FORMATS = ("merged", "adapter")
EXPORT_FILE = "clinft_export.json"
CARD_FILE = "MODEL_CARD.md"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PROBE_TOKENS, PROBE_SEED = 48, 0
# The largest |logit difference| an export may show against the scored model, relative to the largest
# |logit|, before it is refused: float32 merging and re-association stay far below it; a merge that
# dropped an adapter, or a cast to bf16 that rounds the deltas away, does not.
TOLERANCE = 1e-3


@dataclass(frozen=True)
class Selected:
    """One stage's selected model of a finished study: how to load it and what the card says of it."""

    study: str
    task: str
    stage: str
    model: ModelConfig
    checkpoint: str
    results: dict[str, Any]  # the study's results.json (statistics included)


def from_study(output_dir: str | Path, task: str | None, stage: str) -> Selected:
    """The selected `stage` model of `task` (the only task when None) in a finished study's folder."""
    out = Path(output_dir)
    path = out / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise PreflightError(f"{out} holds no finished study (no results.json); pass the output folder of a study "
                         "that finished") from None
    except ValueError:
        raise PreflightError(f"{path} is not valid JSON; rerun the study") from None
    tasks = results.get("tasks", {})
    if task is None:
        if len(tasks) != 1:
            raise PreflightError(f"{out} has {len(tasks)} tasks ({', '.join(tasks)}); say which with --task")
        task = next(iter(tasks))
    if task not in tasks:
        raise PreflightError(f"{out}: no task {task!r} (it has {', '.join(tasks)}); pass one of them with --task")
    if stage not in ("sft", "dpo"):
        raise PreflightError(f"--stage {stage!r}: export takes sft or dpo (the base model is the one you started from)")
    entry = tasks[task]["stages"][stage]
    model = ModelConfig.model_validate(results["config"]["model"])
    return Selected(results["study"], task, stage, model, entry["checkpoint"], results)


def from_registry(uri: str, tracking_uri: str, scratch: Path) -> Selected:
    """The model a registered version (`models:/<study>-<task>@dpo`, or `/VERSION`) stands for: its
    LoggedModel's `results.json` and `clinft_export.json` (downloaded into `scratch`) say which study,
    task, stage and checkpoint; the checkpoint is read from the study's storage, where it stays."""
    from clinft_ray.tracking import registered_files

    _, files = registered_files(tracking_uri, uri, scratch)
    try:
        meta = json.loads((files / EXPORT_FILE).read_text())
        results = json.loads((files / "results.json").read_text())
    except (OSError, ValueError):
        raise PreflightError(f"{uri} was not registered by clinft-ray (no {EXPORT_FILE} and results.json in its "
                         "artifacts); export the study's folder instead") from None
    model = ModelConfig.model_validate(results["config"]["model"])
    return Selected(results["study"], meta["task"], meta["stage"], model, meta["checkpoint"], results)


def registry_files(selected: Selected, folder: Path) -> dict[str, Any]:
    """What a registered version holds, written into `folder` (on the driver, loading no model): the
    model card, `clinft_export.json` and the study's `results.json`, and for LoRA the chain's combined
    adapter (small: it is the registered model, servable on the base); full weights stay in the
    study's storage, referenced by `checkpoint`. Returns the `clinft_export.json` content."""
    lora = selected.model.finetune == "lora"
    meta: dict[str, Any] = {"study": selected.study, "task": selected.task, "stage": selected.stage,
                            "format": "adapter" if lora else "checkpoint", "base_model": selected.model.name_or_path,
                            "finetune": selected.model.finetune, "checkpoint": selected.checkpoint,
                            "fingerprint": selected.results.get("fingerprint"),
                            "exported": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    folder.mkdir(parents=True, exist_ok=True)
    if lora:
        meta["adapter_rank"] = write_adapter(lora_chain(selected.checkpoint), selected.model.name_or_path, folder)
    (folder / EXPORT_FILE).write_text(json.dumps(meta, indent=1))
    (folder / "results.json").write_text(json.dumps(selected.results, indent=1))
    (folder / CARD_FILE).write_text(model_card(selected, meta))
    return meta


def combine_adapters(chain: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One LoRA adapter equal to a chain of adapters stacked on one base: (its PEFT config, its
    tensors). Each module's delta is sum_i s_i B_i A_i with s_i = alpha_i / r_i; the combined adapter
    stacks the A_i (rank r_1 + ... + r_n), scales each B_i by its s_i, and has scaling 1."""
    import torch
    from safetensors.torch import load_file

    configs = [json.loads((c / ADAPTER_CONFIG).read_text()) for c in chain]
    for c, cfg in zip(chain, configs, strict=True):
        odd = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)]
        if odd:
            raise PreflightError(f"{c}: the adapter uses {', '.join(odd)}, which do not add up into one adapter; "
                             "export --format merged instead")
    weights = [load_file(str(c / ADAPTER_WEIGHTS)) for c in chain]
    modules = [{k.rsplit(".lora_", 1)[0] for k in w if ".lora_A." in k} for w in weights]
    if any(m != modules[0] for m in modules):
        raise PreflightError(f"the adapters of {chain[-1]} adapt different modules; export --format merged instead")
    tensors: dict[str, Any] = {}
    for module in sorted(modules[0]):
        a = [w[f"{module}.lora_A.weight"].float() for w in weights]
        b = [w[f"{module}.lora_B.weight"].float() * (cfg["lora_alpha"] / cfg["r"])
             for w, cfg in zip(weights, configs, strict=True)]
        tensors[f"{module}.lora_A.weight"] = torch.cat(a, dim=0).contiguous()
        tensors[f"{module}.lora_B.weight"] = torch.cat(b, dim=1).contiguous()
    rank = sum(cfg["r"] for cfg in configs)
    targets = configs[0]["target_modules"]
    config = {**configs[0], "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "inference_mode": True,
              "target_modules": sorted(targets) if isinstance(targets, list) else targets}
    return config, tensors


def export(selected: Selected, to: str | Path, fmt: str = "merged", dtype: str | None = None) -> Path:
    """Write `selected` to the new folder `to` as `fmt`, checked against the scored model; returns it.
    `dtype` (merged only): the dtype of the saved weights; None keeps float32 for a merged LoRA chain
    and the trained dtype for full weights."""
    import torch

    dest = Path(to)
    if fmt not in FORMATS:
        raise PreflightError(f"--format {fmt!r}: it takes merged or adapter")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PreflightError(f"{dest} {'is not empty' if dest.is_dir() else 'is a file'}; export into a new folder "
                             "(nothing was written)")
    cfg = selected.model
    if fmt == "adapter" and cfg.finetune != "lora":
        raise PreflightError(f"study {selected.study} fine-tuned full weights: there is no adapter; export --format merged")
    if fmt == "adapter" and dtype:
        raise PreflightError("--dtype applies to --format merged (an adapter stays float32, as PEFT trains it)")
    part = dest.with_name(f".{dest.name}.part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    exact = cfg.model_copy(update={"dtype": "float32"})
    meta: dict[str, Any] = {"study": selected.study, "task": selected.task, "stage": selected.stage, "format": fmt,
                            "base_model": cfg.name_or_path, "finetune": cfg.finetune,
                            "checkpoint": selected.checkpoint, "fingerprint": selected.results.get("fingerprint")}
    if fmt == "adapter":
        meta["adapter_rank"] = write_adapter(lora_chain(selected.checkpoint), cfg.name_or_path, part)
    else:
        model = merged_model(exact if cfg.finetune == "lora" else cfg, selected.checkpoint, dtype)
        if cfg.finetune == "lora":
            model = model.to(getattr(torch, dtype or "float32"))
        meta["dtype"] = str(model.dtype).removeprefix("torch.")
        model.save_pretrained(part, safe_serialization=True)
        del model
    load_tokenizer(cfg).save_pretrained(part)
    meta["check"] = check = probe_difference(exact, selected.checkpoint, part, fmt)
    meta["exported"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if check["max_abs_diff"] > TOLERANCE * check["max_abs_logit"]:
        said = (f"the exported model's logits differ from the scored model's by up to {check['max_abs_diff']:.3g} "
                f"(largest logit {check['max_abs_logit']:.3g})")
        if dtype in ("bfloat16", "float16"):  # asked for: the cast's rounding, said once
            log.warning("%s: the cast to %s rounds the fine-tuning's deltas; --dtype float32 or --format adapter "
                        "keep them", said, dtype)
        else:
            shutil.rmtree(part, ignore_errors=True)
            raise StudyError(f"{said}; nothing was kept. This is a bug in clinft-ray's export: please report it, "
                             "and meanwhile serve the checkpoint with clinft-ray")
    (part / EXPORT_FILE).write_text(json.dumps(meta, indent=1))
    (part / CARD_FILE).write_text(model_card(selected, meta))
    if dest.exists():
        dest.rmdir()
    part.rename(dest)
    return dest


def merged_model(cfg: ModelConfig, checkpoint: str, dtype: str | None = None) -> Any:
    """The scored model as one plain transformers model: full weights in `dtype` (None: as they were
    saved), a LoRA chain merged into the base (in `cfg`'s dtype: float32 for an exact merge)."""
    if cfg.finetune != "lora":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(local_checkpoint(checkpoint), dtype=dtype or "auto")
    from clinft_ray.modeling import load_stacked

    stacked = load_stacked(cfg, checkpoint)
    return stacked.merge_and_unload(adapter_names=[n for n in stacked.peft_config if n.startswith(STACKED)])


def write_adapter(chain: list[Path], base: str, folder: Path) -> int:
    """The chain's combined adapter in PEFT's format, naming `base` as its base model; returns its rank."""
    from safetensors.torch import save_file

    config, tensors = combine_adapters(chain)
    config["base_model_name_or_path"] = base
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return config["r"]


def load_exported(folder: Path, fmt: str, base: str) -> Any:
    """An exported folder loaded as a server would: transformers alone, or PEFT on the base."""
    from transformers import AutoModelForCausalLM

    if fmt == "merged":
        return AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="float32"), folder)


def probe_ids(vocab_size: int) -> Any:
    """Seeded random token ids, the same in every process: a probe with no text in it."""
    import torch

    return torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(PROBE_SEED))


def probe_difference(cfg: ModelConfig, checkpoint: str, folder: Path, fmt: str) -> dict[str, float]:
    """The largest |logit| difference on the probe between the model clinft-ray scored, loaded as the
    study loads it (`modeling.load_model`; in `cfg`'s dtype, float32 here, so that what is measured is
    the export and not the precision of one device), and the exported folder loaded in float32."""
    import torch

    scored = load_model(cfg, checkpoint).to(device()).eval()
    ids = probe_ids(scored.config.vocab_size).to(device())
    with torch.no_grad():
        want = scored(ids).logits.float()
        del scored
        got = load_exported(folder, fmt, cfg.name_or_path).to(device()).eval()(ids).logits.float()
    return {"max_abs_diff": float((want - got).abs().max()), "max_abs_logit": float(want.abs().max()),
            "probe_tokens": PROBE_TOKENS}


def difference(check: dict[str, float]) -> str:
    """An export's check in words: its largest logit difference (identical at 0) and the largest logit."""
    exact = " (identical)" if check["max_abs_diff"] == 0 else ""
    return f"{check['max_abs_diff']:.2g}{exact} (largest logit {check['max_abs_logit']:.3g})"


def model_card(selected: Selected, meta: dict[str, Any]) -> str:
    """MODEL_CARD.md: what was trained on what (fingerprints and row counts, no text), how it was
    selected, how it scored against the base and the other stage, what it cost, which versions, and
    what a clinical model may and may not be used for."""
    from clinft_ray.report import LIBRARIES, installed

    r, t, stage = selected.results, selected.results["tasks"][selected.task], selected.stage
    cfg, entry = selected.model, t["stages"][stage]
    lora = cfg.finetune == "lora"
    how = f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, modules {cfg.lora.target_modules}" if lora else "full weights"
    chain = "SFT, then DPO from the selected SFT model" if stage == "dpo" else "SFT"
    if meta["format"] == "checkpoint":
        form = (f"a reference: the weights stay in the study's storage (`{meta['checkpoint']}`); "
                f"`clinft export models:/{selected.study}-{selected.task}@{stage} --to DIR` writes them as a model "
                "folder")
    elif meta["format"] == "adapter":
        form = (f"one PEFT LoRA adapter on `{cfg.name_or_path}` equal to the whole chain ({chain}), rank "
                f"{meta['adapter_rank']}; serve it with `vllm serve BASE --enable-lora --lora-modules NAME=THIS_FOLDER` (raise "
                "`--max-lora-rank` to at least the rank)")
    else:
        form = f"merged weights (the whole chain: {chain}) in {meta['dtype']}, a plain Hugging Face model folder"
    check = meta.get("check")
    checked = (f"on a probe of {check['probe_tokens']} seeded random token ids (no text), its logits differ from "
               f"those of the model clinft-ray scored by at most {difference(check)}") if check else \
        "by `clinft export`, which compares the logits of what it writes with those of the model clinft-ray scored"
    lines = [f"# {selected.study} / {selected.task}: the {stage.upper()} model", "",
             f"Exported by clinft-ray {installed('clinft-ray')} on {meta['exported']} from the study "
             f"`{selected.study}` (fingerprint `{r.get('fingerprint', '')[:16]}`).", "",
             "## Model", "",
             f"- base model: `{cfg.name_or_path}`; fine-tuning: {how}",
             f"- this folder: {form}",
             f"- checked: {checked}",
             f"- task: {selected.task} ({t['kind']}); selection metric: {t['metric']} on the dev split", "",
             "## Training data", "",
             "Fingerprints and row counts of the splits; this card and this folder hold no row of them.", "",
             "| split | rows | sha256 |", "|---|---|---|"]
    data = t.get("data") or {}
    splits = next((x["splits"] for x in r.get("fingerprint_inputs", {}).get("tasks", []) if x["name"] == selected.task),
                  {})
    for split in ("train", "eval", "dev", "test"):
        d = data.get(split, {})
        lines.append(f"| {split} | {d.get('rows', 'not recorded')} | `{d.get('sha256', splits.get(split, ''))}` |")
    sel = entry["selected"]
    hp = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sel.items()
                   if k not in ("trial", "mlflow_run_id", "step"))
    lines += ["", "## Training procedure", "",
              f"- {stage.upper()} sweep of {entry['trials']} trial{'s' * (entry['trials'] != 1)} (seed {r['config'].get('seed')}); selected on dev "
              f"by {t['metric']}: {hp}, at optimizer step {sel['step']} (trial `{sel['trial']}`, MLflow run "
              f"`{sel['mlflow_run_id']}`)"]
    if stage == "dpo":
        s = t["stages"]["sft"]["selected"]
        lines.append(f"- trained from the selected SFT model (trial `{s['trial']}`, step {s['step']})")
    lines += ["", "## Evaluation", "", f"| stage | dev {t['metric']} | test |", "|---|---|---|"]
    for name in ("base", "sft", "dpo"):
        st = t["stages"].get(name)
        if not st:
            continue
        test = ", ".join(f"{k} {v:.3f}" for k, v in st["test"].items() if isinstance(v, float) and "unparsed" not in k)
        mark = " (this model)" if name == stage else ""
        lines.append(f"| {name.upper()}{mark} | {st.get('dev', {}).get(t['metric'], float('nan')):.3f} | {test} |")
    lines += ["", f"n = {t.get('n_test')} test examples. Paired comparisons on test (the difference is a minus b, "
              "negative where b scored higher, with its paired bootstrap 95% CI):", "",
              "| outcome | a vs b | difference (95% CI) | test | p | adjusted p | significant |",
              "|---|---|---|---|---|---|---|"]
    for c in t.get("comparisons", []):
        boot = c.get("bootstrap", {}).get(c.get("metric", ""), {})
        diff = f"{boot['diff']:+.3f} ({boot['ci'][0]:+.3f}, {boot['ci'][1]:+.3f})" if boot else ""
        lines.append(f"| {c.get('metric', c.get('outcome', ''))} | {c['a'].upper()} vs {c['b'].upper()} | {diff} | "
                     f"{c['test']} | {c['p_value']:.3g} | {c.get('p_adjusted', float('nan')):.3g} | "
                     f"{'yes' if c.get('significant') else 'no'} |")
    if footnote := r.get("multiple_comparisons", {}).get("footnote"):
        lines += ["", footnote]
    lines += ["", "## Compute", "", "| stage | GPU-hours | CPU-hours | cost (USD) |", "|---|---|---|---|"]
    for name in ("base", "sft", "dpo"):
        st = t["stages"].get(name, {})
        lines.append(f"| {name.upper()} | {st.get('gpu_hours', 0):.3g} | {st.get('cpu_hours', 0):.3g} | "
                     f"{st.get('cost_usd', 0):.3g} |")
    trained = r.get("versions", {})
    lines += ["", "## Versions", "",
              "- trained with: " + (", ".join(f"{k} {v}" for k, v in trained.items()) or "not recorded"),
              "- exported with: " + ", ".join(f"{n} {installed(n)}" for n in LIBRARIES), "",
              "## Intended use and limitations", "",
              f"- Made for research on, and evaluation of, the task `{selected.task}` on data like its training "
              "data. It has not been validated for clinical use: any use in care needs a prospective local "
              "validation, clinician oversight of every output, and the approvals your institution and "
              "regulator require for clinical decision support.",
              f"- Its test scores hold for this test split ({t.get('n_test')} examples from the same source as "
              "the training data); they may not carry over to other sites, populations, note styles or later "
              "time periods. Monitor it after deployment.",
              "- Performance per patient subgroup (age, sex, language, ...) was not measured by clinft-ray; "
              "check it before use.",
              "- The weights were trained on the study's data. If that data holds protected health "
              "information, a model can reproduce fragments of it: keep this folder under the same data "
              "governance as the data, and do not publish it.",
              "- Outputs are the task's answer format (labels, option letters or text); free text is not "
              "guaranteed to be correct or complete."]
    return "\n".join(lines) + "\n"
