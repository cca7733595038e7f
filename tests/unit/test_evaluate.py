"""Scoring scores what training trained, on the paper's real tokenizers (Mistral-7B-Instruct-v0.2,
Llama-3-8B-Instruct; `tests/helpers/real_tokenizers.py`) and the demo's own.

For rows of every task kind, the answer ids that loglik scoring sums over are the completion ids
TRL's `SFTTrainer` trains on (its `labels`) and the chosen / rejected ids of `DPOTrainer`, end-of-turn
included; a generation starts from the prompt ids of training; and the log-likelihood scoring
computes, batched and padded, the same sum as a plain forward over TRL's own training row.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from clinft_ray.config import ClassificationTask, ModelConfig, ReasoningTask, SummarizationTask, TriageTask
from clinft_ray.data import Example, dpo_rows, load_split, sft_rows
from clinft_ray.evaluate import (
    _answer_logprob_sums,
    _batches,
    data_problems,
    fit,
    loglik_candidates,
    loglik_choose,
    prompt_ids,
    row_tokens,
)
from clinft_ray.modeling import has_chat_template, load_base, load_tokenizer

SPLITS = {s: f"data/{s}.jsonl" for s in ("train", "eval", "dev", "test")}
TASKS = {
    "classification": ClassificationTask(name="c", kind="classification", labels=["UTI", "pyuria"], splits=SPLITS),
    "triage": TriageTask(name="t", kind="triage", splits=SPLITS),
    "reasoning": ReasoningTask(name="r", kind="reasoning", grading="match", splits=SPLITS),
    "summarization": SummarizationTask(name="s", kind="summarization", splits=SPLITS),
}
ROWS_PER_KIND = 12
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def models(real_models, demo_dir) -> dict[str, Path]:
    return {**real_models, "demo": demo_dir / "model"}


@pytest.fixture(scope="module")
def rows(demo_dir) -> dict[str, list[Example]]:
    """The demo's rows of every kind, plus chat-formatted ones (a multi-turn conversation)."""
    out = {kind: load_split(demo_dir / "data" / kind / "train.jsonl")[:ROWS_PER_KIND] for kind in TASKS}
    turns = [Example(e.id + "-chat", [{"role": "user", "content": "Hello."},
                                      {"role": "assistant", "content": "Hello, what is the case?"},
                                      {"role": "user", "content": e.prompt}], e.chosen, e.rejected, row=e.row)
             for e in out["classification"][:4]]
    return {**out, "chat": turns}


def tokenizer_of(models: dict[str, Path], family: str) -> Any:
    return load_tokenizer(ModelConfig(name_or_path=str(models[family])))


def sft_dataset(tok: Any, model_path: Path, examples: list[Example]) -> Any:
    """TRL's prepared SFT dataset for these rows, built as `clinft_ray.sft` builds it."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(output_dir=scratch, use_cpu=True, bf16=False, report_to=[], max_length=MAX_LENGTH)
        trainer = SFTTrainer(model=load_base(ModelConfig(name_or_path=str(model_path))), args=args,
                             train_dataset=Dataset.from_list(sft_rows(examples, has_chat_template(tok))),
                             processing_class=tok)
        return trainer.train_dataset


def dpo_dataset(tok: Any, model_path: Path, examples: list[Example]) -> Any:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with tempfile.TemporaryDirectory() as scratch:
        args = DPOConfig(output_dir=scratch, use_cpu=True, bf16=False, report_to=[], max_length=MAX_LENGTH)
        model = load_base(ModelConfig(name_or_path=str(model_path)))
        trainer = DPOTrainer(model=model, ref_model=load_base(ModelConfig(name_or_path=str(model_path))), args=args,
                             train_dataset=Dataset.from_list(dpo_rows(examples, has_chat_template(tok))),
                             processing_class=tok)
        return trainer.train_dataset


def kinds_for(family: str) -> list[str]:
    return [*TASKS, "chat"]


@pytest.mark.parametrize("family", ["mistral", "llama3", "demo"])
def test_scored_answer_ids_are_sft_completion_ids(models, rows, family):
    tok = tokenizer_of(models, family)
    for kind in kinds_for(family):
        examples = rows[kind]
        prepared = sft_dataset(tok, models[family], examples)
        assert len(prepared) == len(examples), "no row may be dropped by TRL here"
        for e, trl_row in zip(examples, prepared, strict=True):
            completion = [i for i, label in zip(trl_row["input_ids"], trl_row["labels"], strict=True) if label != -100]
            t = row_tokens(tok, e.prompt, e.chosen)
            assert t.answer == completion, f"{family}/{kind} {e.id}: scored {tok.convert_ids_to_tokens(t.answer)}, " \
                                           f"trained {tok.convert_ids_to_tokens(completion)}"
            # the end-of-turn token is trained and scored (ChatML's template puts a newline after it)
            assert tok.eos_token_id in completion[-2:]
            assert trl_row["input_ids"] == t.prompt + t.answer
            assert prompt_ids(tok, e.prompt) == t.prompt, "generation starts from the prompt ids of training"


@pytest.mark.parametrize("family", ["mistral", "llama3"])
def test_scored_answer_ids_are_dpo_chosen_and_rejected_ids(models, rows, family):
    tok = tokenizer_of(models, family)
    for kind in kinds_for(family):
        examples = rows[kind]
        prepared = dpo_dataset(tok, models[family], examples)
        assert len(prepared) == len(examples)
        for e, trl_row in zip(examples, prepared, strict=True):
            chosen, rejected = row_tokens(tok, e.prompt, e.chosen), row_tokens(tok, e.prompt, e.rejected)
            assert trl_row["chosen_ids"] == chosen.answer and trl_row["rejected_ids"] == rejected.answer
            assert trl_row["prompt_ids"] == chosen.prompt == rejected.prompt == prompt_ids(tok, e.prompt)


def test_mistral_answer_is_not_tokenized_alone(models):
    """The bug this fixes: after `[/INST]`, "UTI" is `UT, I` in the whole text (what TRL trains) but
    `▁U, TI` when tokenized alone (what scoring used to score)."""
    tok = tokenizer_of(models, "mistral")
    t = row_tokens(tok, "Is it a UTI?", "UTI")
    assert tok.convert_ids_to_tokens(t.answer) == ["UT", "I", "</s>"]
    assert tok.convert_ids_to_tokens(tok("UTI</s>", add_special_tokens=False)["input_ids"]) == ["▁U", "TI", "</s>"]
    assert tok.convert_ids_to_tokens(t.prompt)[-4:] == ["▁[", "/", "INST", "]"]


@pytest.mark.parametrize("family", ["mistral", "llama3"])
def test_loglik_sums_what_a_plain_forward_gives_on_trl_training_rows(models, rows, family):
    """Batched, left-padded, last-columns-only scoring equals the sum of the log-probs at TRL's label
    positions in a forward over the unpadded training row, one row at a time."""
    tok = tokenizer_of(models, family)
    model = load_base(ModelConfig(name_or_path=str(models[family]), dtype="float32")).eval()
    examples = rows["triage"][:3] + rows["reasoning"][:3]  # answers of 3-11 tokens, prompts of several lengths
    prepared = sft_dataset(tok, models[family], examples)
    expected = []
    for trl_row in prepared:
        ids, labels = torch.tensor([trl_row["input_ids"]]), torch.tensor(trl_row["labels"])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = labels[1:]
        keep = targets != -100
        expected.append(float(logp[keep].gather(-1, targets[keep].unsqueeze(-1)).sum()))
    sums = _answer_logprob_sums(model, [r["input_ids"] for r in prepared],
                                [sum(label != -100 for label in r["labels"]) for r in prepared], tok.pad_token_id)
    torch.testing.assert_close(torch.tensor(sums), torch.tensor(expected), rtol=1e-5, atol=1e-4)


def test_loglik_choose_picks_the_label_the_model_prefers(models, rows):
    """A model whose end-of-turn logit is pushed up after "pyuria"'s last token cannot make that choice
    by chance: with two candidates it must pick "pyuria" for every row; without it, the choice follows
    the sums of `_answer_logprob_sums` (checked above)."""
    tok = tokenizer_of(models, "mistral")
    model = load_base(ModelConfig(name_or_path=str(models["mistral"]), dtype="float32")).eval()
    examples = rows["classification"][:4]
    base = loglik_choose(model, tok, examples, ["UTI", "pyuria"], MAX_LENGTH)
    expected = []
    for e in examples:
        sums = [_answer_logprob_sums(model, [t.prompt + t.answer], [len(t.answer)], tok.pad_token_id)[0]
                for t in (row_tokens(tok, e.prompt, a) for a in ("UTI", "pyuria"))]
        expected.append(int(sums[1] > sums[0]))
    assert base == expected


def test_rows_are_batched_by_length_within_the_token_budget():
    pairs = [(k, 0, [0] * n, 1) for k, n in enumerate([9, 7, 5, 5, 2, 1])]
    sizes = [[len(p[2]) for p in b] for b in _batches(pairs, batch_size=3, batch_tokens=15)]
    assert sizes == [[9], [7, 5], [5, 2, 1]]  # 2 x 9 > 15; 3 x 7 > 15; 3 rows is the cap
    assert [[len(p[2]) for p in b] for b in _batches(pairs[:1], 4, 3)] == [[9]]  # too long: alone


def test_loglik_choice_does_not_depend_on_the_batching(models, rows):
    tok = tokenizer_of(models, "llama3")
    model = load_base(ModelConfig(name_or_path=str(models["llama3"]), dtype="float32")).eval()
    examples = rows["classification"][:6]
    alone = loglik_choose(model, tok, examples, ["UTI", "pyuria"], MAX_LENGTH, batch_size=1)
    assert loglik_choose(model, tok, examples, ["UTI", "pyuria"], MAX_LENGTH) == alone
    assert loglik_choose(model, tok, examples, ["UTI", "pyuria"], MAX_LENGTH, batch_tokens=200) == alone


def test_bf16_model_is_scored_through_a_float32_head(models, rows):
    """On a bf16 model the sums are those of its bf16 hidden states projected in float32, not of its
    bf16 logits (which round by ~0.06 a token at real scale)."""
    tok = tokenizer_of(models, "mistral")
    model = load_base(ModelConfig(name_or_path=str(models["mistral"]), dtype="bfloat16")).eval()
    t = row_tokens(tok, rows["triage"][0].prompt, rows["triage"][0].chosen)
    ids = torch.tensor([t.prompt + t.answer])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
        logp = torch.log_softmax(hidden.float() @ model.lm_head.weight.float().T, dim=-1)
        bf16_logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1).float()
    n = len(t.answer)
    targets = ids[0, 1:].unsqueeze(-1)
    fp32_head = float(logp.gather(-1, targets)[-n:].sum())
    bf16_head = float(bf16_logp.gather(-1, targets)[-n:].sum())
    ours = _answer_logprob_sums(model, [t.prompt + t.answer], [n], tok.pad_token_id)[0]
    assert ours == pytest.approx(fp32_head, abs=1e-4)
    assert abs(bf16_head - fp32_head) > 10 * abs(ours - fp32_head)


def test_scoring_memory_does_not_grow_with_prompt_length_times_vocabulary(models):
    """The largest tensor with a vocabulary-sized dimension that scoring creates is the same for a
    prompt of 20 tokens and one of 400: only answer positions reach the LM head (every tensor an
    operator returns is seen, through PyTorch's dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = load_base(ModelConfig(name_or_path=str(models["llama3"]), dtype="float32")).eval()
    vocab = model.config.vocab_size

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and vocab in t.shape:
                    self.numel = max(self.numel, t.numel())
            return out

    def peak(prompt_tokens: int) -> int:
        rows = [[7] * prompt_tokens + [11, 12, 13] for _ in range(4)]
        with Largest() as seen:
            _answer_logprob_sums(model, rows, [3] * 4, 0)
        return seen.numel

    short, long = peak(20), peak(400)
    assert short == long <= 4 * 3 * vocab


def test_fit_keeps_the_start_as_trl_does():
    assert fit(list(range(10)), 4) == [0, 1, 2, 3] and fit([1, 2], 4) == [1, 2]


def test_loglik_candidates():
    assert loglik_candidates(TASKS["classification"]) == ["UTI", "pyuria"]
    assert loglik_candidates(TASKS["triage"])[0] == "urgent; physician" and len(loglik_candidates(TASKS["triage"])) == 4
    assert loglik_candidates(TASKS["reasoning"]) is None and loglik_candidates(TASKS["summarization"]) is None


def _problems(tok: Any, task: Any, examples: list[Example], max_length: int = MAX_LENGTH) -> list[str]:
    return data_problems(tok, task, {"dev": (Path("dev.jsonl"), examples)}, max_length, "the-model")


def test_validate_reports_rows_the_template_rejects_without_their_text(models, rows):
    tok = tokenizer_of(models, "mistral")
    good = rows["classification"][:3]
    system = Example("sys-1", [{"role": "system", "content": "SECRET-NOTE"}, {"role": "user", "content": "x"}],
                     "UTI", "pyuria", row=7)
    twice = Example("two-users", [{"role": "user", "content": "a"}, {"role": "user", "content": "SECRET-NOTE"}],
                    "UTI", "pyuria", row=9)
    malformed = Example("bad", [{"role": "user"}], "UTI", "pyuria", row=11)
    problems = _problems(tok, TASKS["classification"], [*good, system, twice, malformed])
    assert len(problems) == 2, problems  # one line per problem, naming all its rows
    # Mistral-v0.2's template checks alternation first, so a leading system message fails there too
    assert any("dev.jsonl: rows 7, 9 (ids sys-1, two-users): column 'prompt': the chat template of the-model "
               "rejects these messages (TemplateError: Conversation roles must alternate" in p for p in problems)
    tool = Example("tool", [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "UTI", "pyuria")
    assert "Only user and assistant roles are supported!" in _problems(tok, TASKS["classification"], [tool])[0]
    assert any("row 11 (id bad): column 'prompt': malformed chat messages" in p for p in problems)
    assert not any("SECRET-NOTE" in p for p in problems)
    # Llama 3's template has a system role
    assert _problems(tokenizer_of(models, "llama3"), TASKS["classification"], [*good, system]) == []


def test_validate_reports_every_row_that_would_be_cut(models, rows):
    """max_length between the shortest and the longest row: the rows that do not fit are reported in one
    line per column (and per loglik candidate), naming their rows and ids and the tokens they need."""
    tok = tokenizer_of(models, "llama3")
    examples = rows["triage"]

    def length(e: Example, answer: str) -> int:
        t = row_tokens(tok, e.prompt, answer)
        return len(t.prompt) + len(t.answer)

    cut = sorted(length(e, e.chosen) for e in examples)[len(examples) // 2]
    problems = _problems(tok, TASKS["triage"], examples, max_length=cut)
    expected = {"column 'chosen'": [e for e in examples if length(e, e.chosen) > cut],
                "column 'rejected'": [e for e in examples if length(e, e.rejected) > cut]}
    for candidate in loglik_candidates(TASKS["triage"]):
        expected[f"candidate answer {candidate!r}"] = [e for e in examples if candidate not in (e.chosen, e.rejected)
                                                       and length(e, candidate) > cut]
    expected = {what: rows for what, rows in expected.items() if rows}
    assert len(expected) >= 3 and len(problems) == len(expected), problems
    for what, cut_rows in expected.items():
        line = next(p for p in problems if f"): {what}: " in p)
        assert line.startswith(f"dev.jsonl: rows {', '.join(str(e.row) for e in cut_rows)} (ids "
                               f"{', '.join(e.id for e in cut_rows)}): ")
        need = max(length(e, e.chosen if what == "column 'chosen'" else e.rejected if what == "column 'rejected'"
                          else what.split("'")[1]) for e in cut_rows)
        assert f"is up to {need} tokens, so truncation at model.max_length {cut} would cut the answer's end" in line
    assert _problems(tok, TASKS["triage"], examples) == []


def test_validate_reports_a_prompt_that_changes_once_an_answer_follows(models, rows):
    """A template that renders the generation prompt differently from the conversation (here an extra
    space after the header when generating)."""
    tok = tokenizer_of(models, "llama3")
    tok.chat_template = tok.chat_template.replace("assistant<|end_header_id|>\n\n' }}", "assistant<|end_header_id|>\n\n ' }}")
    problems = _problems(tok, TASKS["classification"], rows["classification"][:2])
    assert len(problems) == 1 and "rows " in problems[0] and "tokenizes differently alone" in problems[0]


@pytest.mark.parametrize("family", ["mistral", "llama3"])
def test_generation_starts_from_the_training_prompt_and_stops_at_max_length(models, rows, family):
    """Greedy generation from `prompt_ids` (left-padded in a batch) equals generation from the same ids
    alone, and no answer runs past `max_length` tokens of prompt + answer (the `fit` policy)."""
    from clinft_ray.evaluate import generate

    tok = tokenizer_of(models, family)
    model = load_base(ModelConfig(name_or_path=str(models[family]), dtype="float32")).eval()
    examples = [rows["reasoning"][0], rows["classification"][0]]  # prompts of different lengths
    batched = generate(model, tok, examples, max_new_tokens=6, max_length=MAX_LENGTH)
    alone = [generate(model, tok, [e], max_new_tokens=6, max_length=MAX_LENGTH)[0] for e in examples]
    assert batched == alone and all(isinstance(a, str) and a for a in batched)
    short = len(prompt_ids(tok, examples[1].prompt)) + 2
    capped = generate(model, tok, examples[1:], max_new_tokens=6, max_length=short)[0]
    assert len(tok(capped, add_special_tokens=False)["input_ids"]) <= 2


@pytest.mark.parametrize("family", ["mistral", "llama3"])
def test_generated_answers_are_scored_on_every_template(models, rows, family):
    """Multiple-choice reasoning scored by `generate` on each real chat template (Mistral's refuses a
    system role and demands alternating turns; Llama 3's has headers and <|eot_id|>): every answer is
    accounted for, parsed to an option letter or to nothing, and the outcomes carry letters, not text."""
    from clinft_ray.evaluate import score_split

    tok = tokenizer_of(models, family)
    model = load_base(ModelConfig(name_or_path=str(models[family]), dtype="float32"))
    task = ReasoningTask(name="mcq", kind="reasoning", grading="match", max_new_tokens=8, splits=SPLITS)
    examples = rows["reasoning"]
    scored = score_split(model, tok, task, examples, MAX_LENGTH)
    assert scored.ids == [e.id for e in examples] and len(scored.answers) == len(examples)
    assert 0.0 <= scored.metrics["accuracy"] <= 1.0 and 0 <= scored.metrics["unparsed"] <= len(examples)
    preds = scored.outcomes["pred"]
    assert len(preds) == len(examples) and all(p in (None, "A", "B", "C", "D", "E") for p in preds)
    assert scored.metrics["unparsed"] == preds.count(None)
    assert scored.outcomes["correct"] == [p == g for p, g in zip(preds, scored.outcomes["gold"], strict=True)]
