"""The study config and search-space files: strict, validated once, every problem reported together."""

import shutil
from pathlib import Path

import pytest
import yaml

from clinft_ray.config import ConfigError, load_study
from clinft_ray.spaces import load_space

from helpers import REPO

SPACES = REPO / "tune_spaces"
ROW = '{"id": "1", "prompt": "p", "chosen": "UTI", "rejected": "pyuria"}\n'

STUDY = """\
study: test-study
output_dir: out
model:
  name_or_path: sshleifer/tiny-gpt2
  finetune: lora
tasks:
  - name: uti
    kind: classification
    labels: [UTI, pyuria]
    positive_label: UTI
    splits: {train: data/train.jsonl, eval: data/eval.jsonl, dev: data/dev.jsonl, test: data/test.jsonl}
sft: {space: spaces/demo_sft.yaml}
dpo: {space: spaces/demo_dpo.yaml}
"""


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    """A valid study folder: study.yaml, four one-row splits, and the demo space files."""
    (tmp_path / "data").mkdir()
    for split in ("train", "eval", "dev", "test"):
        (tmp_path / "data" / f"{split}.jsonl").write_text(ROW)
    (tmp_path / "spaces").mkdir()
    for name in ("demo_sft.yaml", "demo_dpo.yaml"):
        shutil.copy(SPACES / name, tmp_path / "spaces" / name)
    (tmp_path / "study.yaml").write_text(STUDY)
    return tmp_path


def write_study(folder: Path, text: str) -> Path:
    path = folder / "study.yaml"
    path.write_text(text)
    return path


def problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_study(path, overrides)
    return err.value.problems


def test_load_study_resolves_paths_against_the_config_folder(study_dir, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # not the config's folder
    study = load_study(study_dir / "study.yaml")
    cfg = study.config
    assert cfg.study == "test-study" and cfg.seed == 0
    assert cfg.output_dir == (study_dir / "out").resolve()
    assert cfg.tasks[0].splits.dev == (study_dir / "data" / "dev.jsonl").resolve()
    assert cfg.sft.space == (study_dir / "spaces" / "demo_sft.yaml").resolve()
    assert cfg.model.name_or_path == "sshleifer/tiny-gpt2"  # a hub id is left alone
    assert (study.sft_space.stage, study.dpo_space.stage) == ("sft", "dpo")
    assert study.source == (study_dir / "study.yaml").resolve()


def test_unknown_top_level_key_says_did_you_mean(study_dir):
    path = write_study(study_dir, STUDY.replace("model:", "modle:"))
    lines = problems(path)
    assert "modle: unknown key; did you mean 'model'?" in lines
    assert "model: required key is missing; add it" in lines


def test_unknown_nested_key_names_the_dotted_path(study_dir):
    path = write_study(study_dir, STUDY.replace("  finetune: lora", "  finetun: lora"))
    assert problems(path) == ["model.finetun: unknown key; did you mean 'finetune'?"]


def test_unknown_key_inside_a_list_item(study_dir):
    lines = problems(study_dir / "study.yaml", ["tasks.0.splitz=x"])
    assert lines == ["tasks.0.splitz: unknown key; did you mean 'splits'?"]


def test_several_problems_are_reported_together(study_dir):
    text = STUDY.replace("  finetune: lora", "  finetun: lora").replace("output_dir: out", "output_dir: out\nseed: abc")
    with pytest.raises(ConfigError) as err:
        load_study(write_study(study_dir, text))
    assert len(err.value.problems) >= 2
    joined = "\n".join(err.value.problems)
    assert "model.finetun: unknown key" in joined and "seed: " in joined
    assert str(err.value).startswith(str(study_dir / "study.yaml"))  # every line names the file


def test_set_overrides_go_through_validation(study_dir):
    study = load_study(study_dir / "study.yaml", ["seed=3", "tasks.0.scoring=generate"])
    assert study.config.seed == 3
    assert study.config.tasks[0].scoring == "generate"


def test_bad_override_names_the_key(study_dir):
    lines = problems(study_dir / "study.yaml", ["resources.cpus_per_trial=-1"])
    assert len(lines) == 1 and lines[0].startswith("resources.cpus_per_trial:")
    assert lines[0] == "resources.cpus_per_trial: got -1; it takes a value above 0"


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed", "not key=value"),
        ("tasks.3.name=x", "'3' is neither an index of the 1-item list nor the name of one of its items ('uti')"),
    ],
)
def test_malformed_override(study_dir, override, message):
    assert message in "\n".join(problems(study_dir / "study.yaml", [override]))


@pytest.mark.parametrize(
    "override, key",
    [
        ("seed=1.5", "seed:"),
        ("model.max_length=big", "model.max_length:"),
        ("model.finetune=qlora", "model.finetune:"),
        ("tasks.0.labels=UTI", "tasks.0.labels:"),
        ("tasks.0.scoring=vote", "tasks.0.scoring:"),
        ("resources.gpus_per_trial=-1", "resources.gpus_per_trial:"),
        ("stats.alpha=1.5", "stats.alpha:"),
    ],
)
def test_wrong_types_and_values_name_the_key(study_dir, override, key):
    lines = problems(study_dir / "study.yaml", [override])
    assert any(line.startswith(key) for line in lines), lines


def test_positive_label_must_be_a_label(study_dir):
    lines = problems(study_dir / "study.yaml", ["tasks.0.positive_label=cystitis"])
    assert lines[0].startswith("tasks.0:") and "'cystitis' is not one of labels" in lines[0]


def test_missing_split_file_is_named(study_dir):
    (study_dir / "data" / "dev.jsonl").unlink()
    lines = problems(study_dir / "study.yaml")
    dev = (study_dir / "data" / "dev.jsonl").resolve()
    assert lines == [f"tasks.uti.splits.dev: {dev} does not exist; fix the path"]


def test_space_used_for_the_wrong_stage(study_dir):
    lines = problems(study_dir / "study.yaml", ["sft.space=spaces/demo_dpo.yaml"])
    assert len(lines) == 1 and lines[0].startswith("sft.space (") and "a dpo space, used as the sft space" in lines[0]


# --- search-space files ---------------------------------------------------------------------------

def space_problems(tmp_path: Path, text: str, stage: str) -> list[str]:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_space(path, stage)
    return err.value.problems


def test_dpo_space_needs_beta(tmp_path):
    text = "stage: dpo\nlearning_rate: {grid: [1.0e-5]}\nmax_steps: 10\neval_steps: 5\n"
    assert "a dpo space needs beta" in space_problems(tmp_path, text, "dpo")[0]


def test_sft_space_rejects_beta(tmp_path):
    text = "stage: sft\nlearning_rate: 1.0e-5\nbeta: 0.1\nmax_steps: 10\neval_steps: 5\n"
    assert "beta is a DPO hyperparameter" in space_problems(tmp_path, text, "sft")[0]


def test_eval_steps_above_max_steps_rejected(tmp_path):
    text = "stage: sft\nlearning_rate: 1.0e-5\nmax_steps: 10\neval_steps: 50\n"
    assert "eval_steps: 50 > max_steps 10" in space_problems(tmp_path, text, "sft")[0]


def test_space_unknown_key_says_did_you_mean(tmp_path):
    text = "stage: sft\nlearning_rat: 1.0e-5\nmax_steps: 10\neval_steps: 5\n"
    assert "learning_rat: unknown key; did you mean 'learning_rate'?" in space_problems(tmp_path, text, "sft")


ASHA_SPACE = "stage: sft\nlearning_rate: {grid: [1.0e-5, 1.0e-6]}\nmax_steps: 100\neval_steps: 10\n"


def test_asha_scheduler_builds_rays_asha_on_the_dev_metric_by_step(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(ASHA_SPACE + "scheduler: {asha: {grace_steps: 20, reduction_factor: 3}}\n")
    from ray.tune.schedulers import ASHAScheduler

    sched = load_space(path, "sft").to_scheduler("f1")
    assert isinstance(sched, ASHAScheduler)
    assert (sched._metric, sched._mode, sched._time_attr, sched._max_t) == ("dev/f1", "max", "step", 100)
    # rungs at grace_steps x reduction_factor^k below max_steps: 20 and 60 (180 > 100)
    assert sorted(m for m, _ in sched._brackets[0]._rungs) == [20, 60]


def test_no_scheduler_means_every_trial_to_max_steps(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(ASHA_SPACE)
    assert load_space(path, "sft").to_scheduler("f1") is None


@pytest.mark.parametrize(("line", "message"), [
    ("scheduler: {asha: {grace_steps: 25}}",
     "scheduler.asha.grace_steps: 25 is not a multiple of eval_steps 10: trials are compared where they "
     "report a dev score; use 20"),
    ("scheduler: {asha: {grace_steps: 100}}",
     "scheduler.asha.grace_steps: 100 is not shorter than the trial (max_steps 100), so no trial could stop early; "
     "lower grace_steps, or drop scheduler"),
    ("scheduler: {asha: {grace_steps: 20, reduction_factor: 1}}",
     "scheduler.asha.reduction_factor: got 1; it takes a value above 1"),
    ("scheduler: {asha: {grace_step: 20}}", "scheduler.asha.grace_step: unknown key; did you mean 'grace_steps'?"),
    ("scheduler: {ashaa: {grace_steps: 20}}", "scheduler.ashaa: unknown key; did you mean 'asha'?"),
    ("scheduler: asha", "scheduler: a str is not a scheduler; write {asha: {grace_steps: N, reduction_factor: 3}}, "
     "or leave scheduler out"),
    ("patience: 0", "patience: got 0; it takes a whole number of at least 1"),
    ("patiense: 2", "patiense: unknown key; did you mean 'patience'?"),
])
def test_bad_scheduler_is_one_line_naming_the_fix(tmp_path, line, message):
    assert message in space_problems(tmp_path, ASHA_SPACE + line + "\n", "sft")


def test_num_trials_of_the_paper_grids():
    """SFT: 4 learning rates = 4 trials; DPO: 4 learning rates x 3 betas = 12 trials."""
    assert load_space(SPACES / "paper_sft.yaml", "sft").num_trials() == 4
    assert load_space(SPACES / "paper_dpo.yaml", "dpo").num_trials() == 12


def test_num_trials_counts_grids_times_num_samples(tmp_path):
    """2 x 3 grid, num_samples 2 -> 12; a fixed value adds no factor."""
    path = tmp_path / "s.yaml"
    path.write_text("stage: dpo\nlearning_rate: {grid: [1, 2]}\nbeta: {grid: [0.1, 0.2, 0.3]}\n"
                    "num_samples: 2\nmax_steps: 10\neval_steps: 10\n")
    assert load_space(path, "dpo").num_trials() == 12


SHIPPED = sorted(SPACES.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(SPACES)))
def test_every_shipped_space_loads(path):
    """Every tune_spaces/**/*.yaml validates for the stage it names, and starts with a usage comment."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#")
    stage = yaml.safe_load(text)["stage"]
    space = load_space(path, stage)
    assert space.stage == stage and space.num_trials() >= 1


def test_shipped_spaces_were_found():
    assert len(SHIPPED) >= 4


# --- messages in the user's words, credited to where the value came from ----------------------------

def _lines(err: ConfigError) -> list[str]:
    return str(err).splitlines()


@pytest.mark.parametrize(("override", "line"), [
    ("tasks.0.kind=classifcation",
     "--set tasks.0.kind=classifcation: tasks.0.kind: 'classifcation' is not a task kind; did you mean "
     "'classification'?"),
    ("resources.gpus_per_trial=lots",
     "--set resources.gpus_per_trial=lots: resources.gpus_per_trial: got 'lots'; it takes a number or 'auto'"),
    ("seed=abc", "--set seed=abc: seed: got 'abc'; it takes a whole number"),
    ("model.finetune=lroa", "--set model.finetune=lroa: model.finetune: got 'lroa'; it takes 'lora' or 'full'; did "
     "you mean 'lora'?"),
    ("tasks.uti.labels=UTI", "--set tasks.uti.labels=UTI: tasks.0.labels: got 'UTI'; it takes a list"),
    ("tasks.uti.splits.dev=nope.jsonl", "--set tasks.uti.splits.dev=nope.jsonl: tasks.uti.splits.dev: "),
    ("tasks.0.splits.dev=nope.jsonl", "--set tasks.0.splits.dev=nope.jsonl: tasks.uti.splits.dev: "),
])
def test_override_errors_name_the_override_in_plain_words(study_dir, override, line):
    with pytest.raises(ConfigError) as err:
        load_study(study_dir / "study.yaml", [override])
    lines = _lines(err.value)
    assert len(lines) == 1 and lines[0].startswith(line), lines
    assert ".float" not in lines[0] and "literal[" not in lines[0] and "Input tag" not in lines[0]


def test_a_file_error_and_an_override_error_are_credited_apart(study_dir):
    path = write_study(study_dir, STUDY.replace("  finetune: lora", "  finetun: lora"))
    with pytest.raises(ConfigError) as err:
        load_study(path, ["seed=abc"])
    assert sorted(_lines(err.value)) == sorted([
        f"{path}: model.finetun: unknown key; did you mean 'finetune'?",
        "--set seed=abc: seed: got 'abc'; it takes a whole number",
    ])


def test_a_task_is_addressed_by_name(study_dir):
    assert load_study(study_dir / "study.yaml", ["tasks.uti.scoring=generate"]).config.tasks[0].scoring == "generate"
    with pytest.raises(ConfigError) as err:
        load_study(study_dir / "study.yaml", ["tasks.sepsis.scoring=generate"])
    assert _lines(err.value) == ["--set tasks.sepsis.scoring=generate: tasks: 'sepsis' is neither an index of the "
                                 "1-item list nor the name of one of its items ('uti')"]


def test_missing_task_kind_lists_the_kinds(study_dir):
    path = write_study(study_dir, STUDY.replace("    kind: classification\n", ""))
    assert problems(path) == ["tasks.0.kind: required key is missing; add one of classification, triage, reasoning, "
                              "summarization"]


def test_override_value_that_is_not_yaml(study_dir):
    with pytest.raises(ConfigError) as err:
        load_study(study_dir / "study.yaml", ["tasks.0.labels=[UTI"])
    assert _lines(err.value) == ["--set tasks.0.labels=[UTI: the value is not valid YAML; quote it, e.g. "
                                 "--set 'key=\"...\"'"]


SPACE = "stage: {stage}\nlearning_rate: {{grid: [1.0e-5, 1.0e-6]}}\nmax_steps: 100\neval_steps: 10\n"


@pytest.mark.parametrize(("stage", "line", "message"), [
    ("sft", "learning_rate: -1.0e-5", "learning_rate: -1e-05 is not positive; every learning_rate must be above 0"),
    ("sft", "learning_rate: {grid: [1.0e-5, 0]}", "learning_rate: 0 is not positive;"),
    ("sft", "learning_rate: {choice: [.nan]}", "learning_rate: nan is not positive;"),
    ("dpo", "beta: {grid: [0.1, -0.3]}", "beta: -0.3 is not positive; every beta must be above 0, e.g. 0.1"),
    ("dpo", "beta: 0", "beta: 0 is not positive;"),
    ("sft", "learning_rate: {grid: []}", "learning_rate.grid: got an empty list; it takes at least 1 item(s)"),
    ("sft", "learning_rate: {grid: [1.0e-5, 1.0e-5]}", "learning_rate.grid: grid lists 1e-05 more than once; list "
     "each value once"),
    ("dpo", "beta: {choice: [0.1, 0.1]}", "beta.choice: choice lists 0.1 more than once;"),
    ("sft", "learning_rate: {grid: [fast]}", "learning_rate.grid.0: got 'fast'; it takes a number"),
    ("sft", "batch_size: 0", "batch_size: got 0; it takes a whole number of at least 1"),
    ("sft", "batch_size: 2.5", "batch_size: got 2.5; it takes a whole number"),
    ("sft", "gradient_accumulation_steps: 0", "gradient_accumulation_steps: got 0; it takes a whole number of at "
     "least 1"),
    ("sft", "max_steps: 0", "max_steps: got 0; it takes a whole number of at least 1"),
    ("sft", "eval_steps: -5", "eval_steps: got -5; it takes a whole number of at least 1"),
    ("sft", "patience: -1", "patience: got -1; it takes a whole number of at least 1"),
    ("sft", "scheduler: {asha: {grace_steps: 200}}", "scheduler.asha.grace_steps: 200 is not shorter than the trial"),
])
def test_search_space_values_outside_their_meaning(tmp_path, stage, line, message):
    base = SPACE.format(stage=stage) + ("beta: 0.1\n" if stage == "dpo" and not line.startswith("beta") else "")
    lines = space_problems(tmp_path, base + line + "\n", stage)
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_storage_path_defaults_to_the_output_folder_and_resolves_like_a_path(demo_dir, tmp_path):
    assert load_study(demo_dir / "study.yaml").config.storage_path == str(demo_dir / "ray")
    shared = load_study(demo_dir / "study.yaml", ["storage_path=shared/ray"]).config.storage_path
    assert shared == str(demo_dir / "shared" / "ray")
    assert load_study(demo_dir / "study.yaml", ["storage_path=s3://bucket/x"]).config.storage_path == "s3://bucket/x"
