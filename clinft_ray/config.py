"""The study config: typed, strict, and validated completely before any compute.

A study is one YAML file (see `examples/study.yaml`). `load_study(path, overrides)` reads it, applies
`--set key=value` overrides to the raw data (so they go through the same validation), resolves
relative paths against the config file's folder, loads the two search-space files, and returns a
frozen `StudyConfig`. Every problem is collected and raised together as one `ConfigError` whose lines
name the dotted key, the bad value's type (never a data row) and the fix; unknown keys get a
"did you mean".
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clinft_ray.errors import ConfigError, format_errors
from clinft_ray.spaces import SearchSpace, load_space

SPLITS = ("train", "eval", "dev", "test")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class ModelConfig(_Strict):
    name_or_path: str = Field(min_length=1, description="hub id or local path")
    finetune: Literal["lora", "full"] = "lora"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora: LoraConfig = LoraConfig()
    max_length: int = Field(1024, gt=8, description="prompt + answer tokens; longer rows are truncated")
    activation_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute each layer's activations in the backward pass instead of keeping them: "
        "what makes 2,048-token rows of an 8B model fit one 80 GB GPU, for about a third more compute; "
        "auto: on where trials train on a GPU, off on CPU")


class Splits(_Strict):
    train: Path
    eval: Path
    dev: Path
    test: Path


def _check_labels(labels: list[str], positive: str | None, where: str) -> None:
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}labels {labels} repeat a label; list each label once")
    if positive is not None and positive not in labels:
        raise ValueError(f"{where}positive_label {positive!r} is not one of labels {labels}; pick one of them, "
                         "or drop positive_label for macro F1")
    if positive is not None and len(labels) != 2:
        raise ValueError(f"{where}positive_label needs exactly two labels; drop it for macro F1")


class _Task(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    splits: Splits


class ClassificationTask(_Task):
    """One label per answer. Selection metric: F1 (binary of `positive_label`, else macro)."""

    kind: Literal["classification"]
    labels: list[str] = Field(min_length=2)
    positive_label: str | None = None
    scoring: Literal["loglik", "generate"] = "loglik"
    max_new_tokens: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _labels(self) -> ClassificationTask:
        _check_labels(self.labels, self.positive_label, "")
        return self

    metric: ClassVar[str] = "f1"

    @property
    def outcome_metrics(self) -> dict[str, str]:
        """Per-example outcome -> the aggregate metric it feeds (one comparison per outcome)."""
        return {"correct": "f1"}


class LabelSet(_Strict):
    labels: list[str] = Field(min_length=2)
    positive_label: str | None = None


PAPER_TRIAGE = {
    "urgency": LabelSet(labels=["urgent", "non-urgent"], positive_label="urgent"),
    "responder": LabelSet(labels=["physician", "medical assistant"], positive_label="physician"),
}


class TriageTask(_Task):
    """Several label sets answered together (the paper: urgency and responder), e.g. "urgent; physician".
    F1 per label set; selection on their mean (`f1`)."""

    kind: Literal["triage"]
    label_sets: dict[str, LabelSet] = Field(default_factory=lambda: dict(PAPER_TRIAGE), min_length=1)
    answer_template: str | None = Field(
        None, description="how an answer is written, e.g. '{urgency}; {responder}' (the default: sets joined by '; ')")
    scoring: Literal["loglik", "generate"] = "loglik"
    max_new_tokens: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _sets(self) -> TriageTask:
        for name, ls in self.label_sets.items():
            _check_labels(ls.labels, ls.positive_label, f"label_sets.{name}: ")
        missing = [n for n in self.label_sets if "{" + n + "}" not in self.template]
        if missing:
            raise ValueError(f"answer_template lacks {', '.join('{' + n + '}' for n in missing)}; name every label set")
        return self

    @property
    def template(self) -> str:
        return self.answer_template or "; ".join("{" + n + "}" for n in self.label_sets)

    metric: ClassVar[str] = "f1"

    @property
    def outcome_metrics(self) -> dict[str, str]:
        return {f"correct_{n}": f"f1_{n}" for n in self.label_sets}


class ReasoningTask(_Task):
    """Open-ended answers graded correct/incorrect against the gold answer: normalized match (or the
    option letter, when a row has `options`), or the judge. Selection metric: accuracy."""

    kind: Literal["reasoning"]
    grading: Literal["match", "judge"] = "match"
    max_new_tokens: int = Field(48, gt=0)

    metric: ClassVar[str] = "accuracy"

    @property
    def outcome_metrics(self) -> dict[str, str]:
        return {"correct": "accuracy"}


class SummarizationTask(_Task):
    """Summaries rated 1-5 by the judge with a rubric, plus ROUGE-L against the gold summary.
    Selection metric: the mean judge score; comparisons by paired t-test."""

    kind: Literal["summarization"]
    max_new_tokens: int = Field(128, gt=0)

    metric: ClassVar[str] = "judge"

    @property
    def outcome_metrics(self) -> dict[str, str]:
        return {"score": "judge"}


TaskConfig = Annotated[ClassificationTask | TriageTask | ReasoningTask | SummarizationTask,
                       Field(discriminator="kind")]
TASK_KINDS = {"classification": ClassificationTask, "triage": TriageTask, "reasoning": ReasoningTask,
              "summarization": SummarizationTask}


def _is_internal(host: str) -> bool:
    """Loopback, private or link-local addresses, and single-label or .local/.internal/.lan names."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost" or "." not in host or host.endswith((".local", ".internal", ".lan", ".localdomain"))
    return ip.is_loopback or ip.is_private or ip.is_link_local


class JudgeConfig(_Strict):
    """An OpenAI-compatible chat-completions endpoint that grades open answers and summaries."""

    base_url: str = Field(pattern=r"^https?://", description="e.g. http://127.0.0.1:8000/v1 (a vLLM server)")
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(None, description="name of the env var holding the key (never the key)")
    temperature: float = Field(0.0, ge=0, le=2)
    concurrency: int = Field(4, gt=0)
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(60, gt=0)
    allow_external: bool = Field(False, description="opt in to sending patient text outside your network")
    correctness_rubric: str | None = None
    summary_rubric: str | None = None

    @model_validator(mode="after")
    def _where(self) -> JudgeConfig:
        host = urlparse(self.base_url).hostname or ""
        if not self.allow_external and not _is_internal(host):
            raise ValueError(f"base_url host {host!r} is outside your network and the judge sends patient text "
                             "to it; use an on-premises endpoint, or set judge.allow_external: true to opt in")
        return self


class StageConfig(_Strict):
    space: Path


class Resources(_Strict):
    """What one trial asks Ray for.

    `gpus_per_trial` below 1 packs several (LoRA) trials on one GPU; 1 is one GPU per trial; a whole
    number above 1 runs the trial as a Ray Train `TorchTrainer` with one worker per GPU (DDP or FSDP,
    `strategy`), for models that do not fit one GPU. On CPU, `workers_per_trial` does the same with
    the gloo backend, `cpus_per_trial` CPUs per worker.
    """

    gpus_per_trial: float | Literal["auto"] = "auto"
    cpus_per_trial: float = Field(1, gt=0)
    workers_per_trial: int = Field(1, ge=1, description="data-parallel workers per trial; default: one per GPU")
    strategy: Literal["ddp", "fsdp"] = "ddp"

    @field_validator("gpus_per_trial")
    @classmethod
    def _gpus(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and v < 0:
            raise ValueError(f"gpus_per_trial is {v}; use 0 for CPU, a fraction, a whole number, or 'auto'")
        if isinstance(v, float | int) and v > 1 and v != int(v):
            raise ValueError(f"gpus_per_trial is {v}; above 1 it must be a whole number (one worker per GPU)")
        return v

    @model_validator(mode="after")
    def _workers(self) -> Resources:
        gpus = self.gpus_per_trial
        if isinstance(gpus, float | int) and gpus > 1 and self.workers_per_trial not in (1, int(gpus)):
            raise ValueError(f"workers_per_trial is {self.workers_per_trial} but gpus_per_trial is {gpus:g}: a "
                             "multi-GPU trial runs one worker per GPU; drop workers_per_trial")
        if isinstance(gpus, float | int) and 0 < gpus <= 1 and self.workers_per_trial > 1:
            n = self.workers_per_trial
            why = f"1 asks for {n} GPUs" if gpus == 1 else "a fraction would put two NCCL ranks on one GPU"
            raise ValueError(f"workers_per_trial is {n} but gpus_per_trial is {gpus:g}: each worker of a multi-worker "
                             f"trial holds a whole GPU ({why}); set gpus_per_trial: {n}, or workers_per_trial: 1")
        return self

    def workers(self, gpus: float) -> int:
        """Data-parallel workers of a trial that gets `gpus` GPUs (after 'auto' is resolved)."""
        return int(gpus) if gpus > 1 else self.workers_per_trial

    def resolve_gpus(self, cluster_gpus: float) -> float:
        """`gpus_per_trial`, with 'auto' resolved: one GPU per worker where Ray sees a GPU, else 0."""
        if self.gpus_per_trial != "auto":
            return float(self.gpus_per_trial)
        return float(self.workers_per_trial) if cluster_gpus >= 1 else 0.0


class StatsConfig(_Strict):
    """The test statistics; none of it changes training, so `clinft report` can redo it (see `analysis`)."""

    alpha: float = Field(0.05, gt=0, lt=1)
    correction: Literal["bonferroni", "holm"] = Field(
        "bonferroni", description="multiple comparisons: Bonferroni (the paper's) or Holm's step-down")
    count_pairs: bool = Field(
        False, description="count the 3 pairs per outcome in m (m = 3 x outcomes); the paper does not")
    comparisons: int | None = Field(
        None, gt=0, description="Bonferroni's m set by hand; default: the number of outcomes compared (the "
        "paper's 5: one per classification, reasoning or summarization task, one per triage label set)")
    bootstrap_resamples: int = Field(2000, ge=100, le=1_000_000,
                                     description="resamples of the paired bootstrap CIs of metric differences")
    seed: int = Field(0, description="seed of the bootstrap resampling")

    @model_validator(mode="after")
    def _holm(self) -> StatsConfig:
        if self.correction == "holm" and self.comparisons is not None:
            raise ValueError(f"comparisons is {self.comparisons} but correction is holm, which adjusts over the "
                             "actual family of tests; drop comparisons or use correction: bonferroni")
        return self


class CostConfig(_Strict):
    """Prices that turn device-hours into `cost_usd` on every run (0: not priced)."""

    gpu_hour_usd: float = Field(0.0, ge=0, description="price of one GPU for one hour, e.g. 2.5 for an A100")
    cpu_hour_usd: float = Field(0.0, ge=0)


class MlflowConfig(_Strict):
    tracking_uri: str | None = None
    experiment: str | None = None
    log_examples: int = Field(0, ge=0, description="opt in: log the first N test answers per stage (may be PHI)")
    outage_wait_s: float = Field(600, ge=0, description="at the end of a study, how long to wait for a tracking "
                                 "server that does not answer before saving the writes held for it")
    register_models: bool = Field(True, description="register each task's selected SFT and DPO models in the MLflow "
                                  "Model Registry as <study>-<task>, aliases sft and dpo")


class RayConfig(_Strict):
    address: str | None = Field(None, description="None: start a local Ray; 'auto' or ray://...: join one")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local Ray; default: all")


class StudyConfig(_Strict):
    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: Path
    storage_path: str | None = Field(
        None, description="checkpoints and Tune state: a folder every node sees (NFS, a shared volume) or a URI "
        "Ray's storage supports (s3://, gs://); default: OUTPUT_DIR/ray")
    seed: int = 0
    model: ModelConfig
    tasks: list[TaskConfig] = Field(min_length=1)
    sft: StageConfig
    dpo: StageConfig
    resources: Resources = Resources()
    trial_retries: int = Field(2, ge=0, description="times a failed trial is retried from its latest checkpoint")
    stats: StatsConfig = StatsConfig()
    cost: CostConfig = CostConfig()
    mlflow: MlflowConfig = MlflowConfig()
    ray: RayConfig = RayConfig()
    judge: JudgeConfig | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> StudyConfig:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names {dupes} repeat; give every task its own name")
        needs = [t.name for t in self.tasks if t.kind == "summarization" or getattr(t, "grading", "") == "judge"]
        if needs and self.judge is None:
            raise ValueError(f"tasks {needs} are graded by a judge but the config has no judge: section; add "
                             "judge: {base_url: ..., model: ...}")
        if self.resources.strategy == "fsdp" and self.model.finetune == "lora":
            # transformers' FSDP save gathers the whole model to rank 0 at every checkpoint to keep the
            # adapter, and adapter-only gathering cannot be tested here (Trainer runs FSDP on GPUs only)
            raise ValueError("resources.strategy fsdp with model.finetune lora is not supported: every checkpoint "
                             "would gather the whole model to save the adapter; a LoRA trial of a 7-8B model fits "
                             "one GPU, so use strategy: ddp (or finetune: full for FSDP)")
        return self


class Study(BaseModel):
    """A validated study: the config and its two loaded search spaces."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    config: StudyConfig
    sft_space: SearchSpace
    dpo_space: SearchSpace
    source: Path


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`["a.b=1", "tasks.0.name=x"]` -> `[("a.b", 1), ("tasks.0.name", "x")]`; values are YAML."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", [f"{item!r} is not key=value; write e.g. --set seed=1"])
        try:
            out.append((key.strip(), yaml.safe_load(value) if value else ""))
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}", ["the value is not valid YAML; quote it, e.g. --set 'key=\"...\"'"]) \
                from None
    return out


def apply_override(data: dict, key: str, value: Any) -> list[str]:
    """Set a dotted key in raw config data, creating missing mappings. A list item is addressed by
    index or, for items with a `name` (tasks), by name: `tasks.uti.scoring`. Returns the key with
    list items by index."""
    parts = key.split(".")
    node: Any = data
    where: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, key, ".".join(parts[:i]))
            where.append(str(idx))
            if last:
                node[idx] = value
            node = node[idx]
        elif isinstance(node, dict):
            where.append(part)
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {key}", [f"{'.'.join(parts[:i])} is not a mapping or list"])
    return where


def _list_index(items: list, part: str, key: str, parent: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    known = ", ".join(repr(n) for n in names if isinstance(n, str))
    raise ConfigError(f"--set {key}", [f"{parent}: {part!r} is neither an index of the {len(items)}-item list nor "
                                       f"the name of one of its items{f' ({known})' if known else ''}"])


def _resolve(base: Path, p: Path | str) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else (base / p).resolve()


def load_study(path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None) -> Study:
    """Read, override, validate and resolve a study config and its search spaces.

    Raises `ConfigError` listing every problem found. Relative paths in the file are relative to the
    file's folder; `--out` (`output_dir`) is relative to the current directory.
    """
    source = Path(path)
    if not source.is_file():
        raise ConfigError(str(source), ["file not found; pass the path of a study YAML"])
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f"line {where.line + 1}: " if where else ""
        raise ConfigError(str(source), [f"{line}not valid UTF-8 YAML; fix the syntax"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(source), ["the file must be a YAML mapping of keys (study:, model:, tasks:, ...)"])
    overrides = overrides or []
    set_keys = []
    for (key, value), item in zip(parse_overrides(overrides), overrides, strict=True):
        try:
            set_keys.append((apply_override(data, key, value), item))
        except ConfigError as err:
            raise ConfigError(f"--set {item}", err.problems) from None
    if output_dir is not None:
        data["output_dir"] = str(Path(output_dir).resolve())
        set_keys.append((["output_dir"], f"--out {output_dir}"))
    try:
        try:
            cfg = StudyConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigError(str(source), format_errors(err, StudyConfig, TASK_KINDS)) from None
        return _resolve_study(cfg, source)
    except ConfigError as err:
        raise _by_origin(err, set_keys, data) from None


def _by_origin(err: ConfigError, set_keys: list[tuple[list[str], str]], data: dict) -> ConfigError:
    """The same problems, each credited to the `--set` (or `--out`) that set its key, else the file."""
    sources = []
    for problem, source in zip(err.problems, err.sources, strict=True):
        key = problem.split(": ", 1)[0].split(" ", 1)[0].split(".")
        origin = source
        for parts, item in set_keys:
            forms = [parts, _by_name(parts, data)]
            if any(f[:len(key)] == key or key[:len(f)] == f for f in forms if f):
                origin = f"--set {item}" if not item.startswith("--out") else item
                break
        sources.append(origin)
    return ConfigError(err.source, err.problems, sources)


def _by_name(parts: list[str], data: dict) -> list[str] | None:
    """`tasks.0.x` as `tasks.uti.x`, the way the data checks name a task."""
    tasks = data.get("tasks")
    if len(parts) > 1 and parts[0] == "tasks" and parts[1].isdigit() and isinstance(tasks, list) \
            and int(parts[1]) < len(tasks) and isinstance(tasks[int(parts[1])], dict):
        return ["tasks", str(tasks[int(parts[1])].get("name")), *parts[2:]]
    return None


def _storage(base: Path, storage: str | None, output_dir: Path) -> str:
    """A URI stays as written; a folder is resolved like any other path; none means OUTPUT_DIR/ray."""
    if storage is None:
        return str(output_dir / "ray")
    if "://" in storage:
        return storage
    return str(_resolve(base, storage))


def _resolve_study(cfg: StudyConfig, source: Path) -> Study:
    base = source.resolve().parent
    tasks = [
        t.model_copy(update={"splits": Splits(**{s: _resolve(base, getattr(t.splits, s)) for s in SPLITS})})
        for t in cfg.tasks
    ]
    model = cfg.model
    local = _resolve(base, model.name_or_path)
    if local.exists() or model.name_or_path.startswith((".", "/", "~")):
        model = model.model_copy(update={"name_or_path": str(local)})
    cfg = cfg.model_copy(
        update={
            "tasks": tasks,
            "model": model,
            "output_dir": _resolve(base, cfg.output_dir),
            "storage_path": _storage(base, cfg.storage_path, _resolve(base, cfg.output_dir)),
            "sft": StageConfig(space=_resolve(base, cfg.sft.space)),
            "dpo": StageConfig(space=_resolve(base, cfg.dpo.space)),
        }
    )
    problems, spaces = [], {}
    for stage in ("sft", "dpo"):
        try:
            spaces[stage] = load_space(getattr(cfg, stage).space, stage)
        except ConfigError as err:
            problems += [f"{stage}.space ({err.source}): {p}" for p in err.problems]
    for t in cfg.tasks:
        for s in SPLITS:
            p = getattr(t.splits, s)
            if not p.exists():
                problems.append(f"tasks.{t.name}.splits.{s}: {p} does not exist; fix the path")
    if problems:
        raise ConfigError(str(source), problems)
    return Study(config=cfg, sft_space=spaces["sft"], dpo_space=spaces["dpo"], source=source.resolve())
