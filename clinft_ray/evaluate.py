"""Scoring a model on a split by the task's own metric, from the model's outputs.

Two ways to get a model's answer:
- `loglik` (classification and triage; default, fast): the candidate answer (a label, or a
  combination of triage labels written with the task's template) whose tokens, exactly the ones
  training trains (prompt + answer tokenized as one text, as TRL does; end-of-turn included), have
  the highest log-likelihood given the prompt;
- `generate`: greedy decoding of up to `max_new_tokens` from the prompt ids of training, then parsed
  (labels, option letters) or graded (normalized match, the judge) by `tasks`.

Truncation follows `fit`, TRL's policy in training; `data_problems` (run by `clinft validate` and
before every study) refuses the rows it would cut.

`score_split` returns per-example outcomes and the aggregate metrics. Generated text is kept in
memory only: no text leaves this module except to the configured judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clinft_ray.config import ClassificationTask, ReasoningTask, TaskConfig, TriageTask
from clinft_ray.data import Example, as_messages
from clinft_ray.modeling import has_chat_template
from clinft_ray.tasks import (
    classification_scores,
    parse_label,
    parse_triage,
    reasoning_scores,
    summary_scores,
    triage_answers,
    triage_scores,
)


@dataclass(frozen=True)
class Scored:
    """Aggregate metrics, and per-example outcomes by name (bool: correct / incorrect, float: a
    score; labels and option letters: the prediction and the gold one) in the order of `ids`."""

    metrics: dict[str, float]
    ids: list[str]
    outcomes: dict[str, list[Any]]
    answers: list[str]  # the model's answers: in memory only, logged only with mlflow.log_examples


@dataclass(frozen=True)
class RowTokens:
    """A row as training tokenizes it: `prompt` is what the answer follows, `answer` the answer's tokens
    with its end-of-turn; `head` is the prompt tokenized alone, what a generation starts from."""

    head: list[int]
    prompt: list[int]
    answer: list[int]

    @property
    def stable(self) -> bool:
        """Whether the prompt alone tokenizes as the start of prompt + answer (else training's prompt and
        a generation's differ: a template that renders the prompt differently, or a merge at the boundary)."""
        return self.prompt == self.head


def prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """The token ids of a prompt as TRL tokenizes it alone: with the chat template and its generation
    prompt when the model has one, else the text with the tokenizer's special tokens (BOS)."""
    if has_chat_template(tokenizer):
        return _chat_ids(tokenizer, as_messages(prompt), add_generation_prompt=True)
    return tokenizer(text=str(prompt))["input_ids"]


def row_tokens(tokenizer: Any, prompt: Any, answer: str) -> RowTokens:
    """Prompt and answer tokenized as one text and split where TRL's SFT and DPO split them.

    TRL (trl 1.16, `SFTTrainer._prepare_dataset` / `DPOTrainer._prepare_dataset`) tokenizes the prompt
    alone and prompt + answer as one text (the answer as an assistant message under a chat template,
    else the text with the tokenizer's EOS appended), and trains on the tokens after their common
    prefix. Tokenizing the answer on its own would not give the same ids: with Mistral's sentencepiece
    tokenizer "UTI" after `[/INST]` is `UT, I` in the whole text but `▁U, TI` alone.
    """
    from trl.data_utils import common_prefix_length

    head = prompt_ids(tokenizer, prompt)
    if has_chat_template(tokenizer):
        full = _chat_ids(tokenizer, as_messages(prompt) + [{"role": "assistant", "content": answer}])
    else:
        eos = tokenizer.eos_token or ""
        full = tokenizer(text=str(prompt) + (answer if answer.endswith(eos) else answer + eos))["input_ids"]
    n = common_prefix_length(head, full)
    return RowTokens(head=head, prompt=full[:n], answer=full[n:])


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def fit(ids: list[int], max_length: int) -> list[int]:
    """The truncation policy of clinft-ray, the one TRL applies in training (`truncation_mode="keep_start"`):
    keep the first `max_length` tokens of prompt + answer. Used for scoring, so that a row is scored on
    the tokens it was trained on; `clinft validate` reports every row that it would cut."""
    return ids[:max_length]


def loglik_choose(model: Any, tokenizer: Any, examples: list[Example], answers: list[str], max_length: int,
                  batch_size: int = 16, batch_tokens: int = 16384) -> list[int]:
    """For each example, the index of the most likely of `answers`: the sum of the log-probs of the
    answer tokens that training trains on (`row_tokens`, end-of-turn included, cut by `fit`).

    Rows are batched by length, longest first, up to `batch_size` rows and `batch_tokens` padded tokens
    a batch, so a split of long notes does not pad every row to the longest one and a batch of long
    rows stays within the memory of a batch of short ones."""
    import torch

    pairs = []  # (example index, answer index, input ids, number of answer tokens)
    for i, ex in enumerate(examples):
        for j, answer in enumerate(answers):
            t = row_tokens(tokenizer, ex.prompt, answer)
            ids = fit(t.prompt + t.answer, max_length)
            pairs.append((i, j, ids, max(0, len(ids) - len(t.prompt))))
    scores = torch.full((len(examples), len(answers)), float("-inf"))
    for chunk in _batches(sorted(pairs, key=lambda p: -len(p[2])), batch_size, batch_tokens):
        sums = _answer_logprob_sums(model, [ids for _, _, ids, _ in chunk], [n for *_, n in chunk],
                                    tokenizer.pad_token_id)
        for (i, j, _, n), value in zip(chunk, sums, strict=True):
            if n:
                scores[i, j] = value
    return scores.argmax(dim=1).tolist()


def _batches(pairs: list[tuple[Any, ...]], batch_size: int, batch_tokens: int) -> list[list[tuple[Any, ...]]]:
    """Consecutive runs of `pairs` (sorted longest first) of at most `batch_size` rows whose padded size
    (rows x the first row's length) stays within `batch_tokens`; a row longer than that goes alone."""
    out: list[list[tuple[Any, ...]]] = []
    for pair in pairs:
        if out and len(out[-1]) < batch_size and (len(out[-1]) + 1) * len(out[-1][0][2]) <= batch_tokens:
            out[-1].append(pair)
        else:
            out.append([pair])
    return out


def _answer_logprob_sums(model: Any, rows: list[list[int]], n_answer: list[int], pad: int) -> list[float]:
    """Sum of log p(token | earlier tokens) over the last `n_answer[r]` tokens of each row.

    Rows are left-padded so that every answer ends at the last column, with position ids counted from
    each row's first real token (the positions training gives it). Only the hidden states that predict
    an answer token go through the LM head, projected in float32 a slice of the vocabulary at a time
    with a running log-sum-exp (`answer_logprobs`): a batch of 16 rows of 2,048 tokens with Llama 3's
    128,256-token vocabulary would otherwise hold 8 GB of bf16 logits and three times that in float32,
    and bf16 logits round by about 0.06 a token, enough to swap two close candidates.
    """
    import torch

    dev = next(model.parameters()).device
    width, keep = max(len(r) for r in rows), max(n_answer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        mask[r, width - len(ids) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    # predictor column c (of the last keep + 1 columns) predicts the token in column c + 1
    scored = torch.zeros((len(rows), keep), dtype=torch.bool)
    for r, n in enumerate(n_answer):
        scored[r, keep - n :] = True
    targets = input_ids[:, width - keep :]
    with torch.no_grad():
        hidden = final_hidden(model, input_ids.to(dev), mask.to(dev), positions.to(dev))[:, -keep - 1 : -1]
        tok_lp = torch.zeros((len(rows), keep))
        if keep:
            tok_lp[scored] = answer_logprobs(model, hidden[scored.to(dev)], targets[scored].to(dev)).cpu()
    return [float(tok_lp[r].sum()) if n else float("-inf") for r, n in enumerate(n_answer)]


def _causal_lm(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (its LoRA layers stay in place and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden(model: Any, input_ids: Any, mask: Any, positions: Any) -> Any:
    """The backbone's last hidden states (what the LM head reads), without any logits."""
    lm = _causal_lm(model)
    return lm.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=False).last_hidden_state


def answer_logprobs(model: Any, hidden: Any, targets: Any) -> Any:
    """log p(target) of each hidden state ([N, H] -> [N]) through the model's LM head in float32, with
    TRL's chunked log-softmax (`trl.kernels.ChunkedLogProbFunction`, the kernel of TRL's fused LM
    head): a 32,768-token slice of the vocabulary at a time, so the peak is N x 32,768, not N x vocab,
    and the head's weights are upcast a slice at a time. The model's final-logit soft-capping and
    logit scale (Gemma, Cohere) are applied as TRL applies them."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    lm = _causal_lm(model)
    text = lm.config.get_text_config()
    head = lm.get_output_embeddings()
    with torch.autocast(hidden.device.type, enabled=False):
        log_probs, *_ = ChunkedLogProbFunction.apply(
            hidden.float(), head.weight, head.bias, targets, 1.0, 32768,
            getattr(text, "final_logit_softcapping", None), getattr(text, "logit_scale", None) or 1.0, ())
    return log_probs


def generate(model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int, max_length: int,
             batch_size: int = 16) -> list[str]:
    """Greedy answers, decoded without special tokens. Each generation starts from the prompt ids of
    training (`prompt_ids`) and, as `fit` cuts a training row, stops at `max_length` tokens in all."""
    import torch

    dev = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [prompt_ids(tokenizer, e.prompt) for e in chunk]
        budgets = [max(0, min(max_new_tokens, max_length - len(p))) for p in prompts]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, p in enumerate(prompts):  # left padding, so every answer starts at column `width`
            input_ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        if max(budgets) == 0:
            texts += [""] * len(chunk)
            continue
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=max(budgets), pad_token_id=tokenizer.pad_token_id)
        texts += [tokenizer.decode(row[:budget], skip_special_tokens=True)
                  for row, budget in zip(out[:, width:].tolist(), budgets, strict=True)]
    return texts


def score_split(model: Any, tokenizer: Any, task: TaskConfig, examples: list[Example], max_length: int,
                judge: Any = None) -> Scored:
    """Score `examples` by the task kind's metrics; the model is put in eval mode and restored after.
    `judge` (a `judge.Judge`) is needed for summarization and judge-graded reasoning."""
    was_training = model.training
    model.eval()
    try:
        metrics, outcomes, answers = _score(model, tokenizer, task, examples, max_length, judge)
    finally:
        model.train(was_training)
    return Scored(metrics=metrics, ids=[e.id for e in examples], outcomes=outcomes, answers=answers)


def _score(model: Any, tok: Any, task: TaskConfig, examples: list[Example], max_length: int,
           judge: Any) -> tuple[dict[str, float], dict[str, list[Any]], list[str]]:
    def answers_by(candidates: list[str]) -> list[int]:
        return loglik_choose(model, tok, examples, candidates, max_length)

    def texts() -> list[str]:
        return generate(model, tok, examples, task.max_new_tokens, max_length)

    if isinstance(task, ClassificationTask):
        if task.scoring == "loglik":  # the chosen candidate is the prediction: nothing to parse
            said = preds = [task.labels[k] for k in answers_by(task.labels)]
        else:
            said = texts()
            preds = [parse_label(t, task.labels) for t in said]
        return (*classification_scores(task, examples, preds), said)
    if isinstance(task, TriageTask):
        if task.scoring == "loglik":
            combos = triage_answers(task)
            picked = [combos[k] for k in answers_by([task.template.format(**c) for c in combos])]
            said = [task.template.format(**c) for c in picked]
        else:
            said = texts()
            picked = [parse_triage(t, task) for t in said]
        return (*triage_scores(task, examples, picked), said)
    if isinstance(task, ReasoningTask):
        said = texts()
        return (*reasoning_scores(task, examples, said, judge), said)
    said = texts()
    return (*summary_scores(examples, said, judge), said)


def loglik_candidates(task: TaskConfig) -> list[str] | None:
    """The answers `loglik` scoring compares (labels, or every combination of triage labels written with
    the task's template), or None when the task generates its answers."""
    if getattr(task, "scoring", None) != "loglik":
        return None
    if isinstance(task, TriageTask):
        return [task.template.format(**c) for c in triage_answers(task)]
    return list(task.labels) if isinstance(task, ClassificationTask) else None


MAX_ROWS_NAMED = 10


def data_problems(tokenizer: Any, task: TaskConfig, splits: dict[str, tuple[Any, list[Example]]], max_length: int,
                  model_name: str) -> list[str]:
    """Checks that need the tokenizer (not the model), on every row of every split (`splits` maps split
    name -> (path, examples)): chat-formatted prompts for a model without a chat template; messages
    that are malformed or that the chat template rejects (a system role on Mistral, turns that do not
    alternate); a prompt that the template or the tokenizer renders differently once an answer
    follows (training would start the answer elsewhere than a generation does); and rows that `fit`
    would cut at `max_length` (prompt + chosen, prompt + rejected and, for `loglik` scoring, prompt +
    each candidate answer), which always loses the answer's end and its end-of-turn token.

    One line per problem and file, naming the rows, ids and column, never their text.
    """
    problems = []
    chat = has_chat_template(tokenizer)
    answers = [("chosen", None), ("rejected", None)] + [
        ("prompt", c) for c in loglik_candidates(task) or []]
    for path, examples in splits.values():
        if not chat and any(not isinstance(e.prompt, str) for e in examples):
            problems.append(f"{path}: prompts are chat messages but the model {model_name} has no chat template; "
                            "use a chat/instruct model or plain-text prompts")
            continue
        found: dict[str, list[Example]] = {}
        longest: dict[str, int] = {}
        for e in examples:
            for why, n_tokens in _row_problems(tokenizer, e, answers, max_length, model_name):
                found.setdefault(why, []).append(e)
                longest[why] = max(longest.get(why, 0), n_tokens)
        for why, rows in found.items():
            problems.append(f"{path}: {_rows_named(rows)}: {why.replace('{longest}', str(longest[why]))}")
    return problems


def _row_problems(tokenizer: Any, e: Example, answers: list[tuple[str, str | None]], max_length: int,
                  model_name: str) -> list[tuple[str, int]]:
    """(problem, token count) pairs of one row; the problem text names no row content."""
    if not isinstance(e.prompt, str) and not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in e.prompt):
        return [("column 'prompt': malformed chat messages; write a list of {\"role\": ..., \"content\": ...} "
                 "objects with text values", 0)]
    out = []
    for column, candidate in answers:
        if candidate is not None and candidate in (e.chosen, e.rejected):
            continue  # checked as its column
        answer = getattr(e, column) if candidate is None else candidate
        try:
            t = row_tokens(tokenizer, e.prompt, answer)
        except Exception as exc:  # noqa: BLE001 (whatever the template raises, report it by row)
            return [(f"column 'prompt': the chat template of {model_name} rejects these messages "
                     f"({_safe_reason(exc, e)}); fix the roles or their order (e.g. merge a system message into "
                     "the first user message for a template without a system role)", 0)]
        what = f"column {column!r}" if candidate is None else f"candidate answer {candidate!r}"
        if not t.stable and not any(why.startswith("column 'prompt'") for why, _ in out):
            out.append(("column 'prompt': the prompt tokenizes differently alone than followed by the answer (the chat "
                        "template renders it differently, or a token spans the boundary), so generation would "
                        "start from another prompt than training; use a template whose generation prompt is a "
                        "prefix of the conversation, or end the prompt on a token boundary", 0))
        n = len(t.prompt) + len(t.answer)
        if n > max_length:
            out.append((f"{what}: prompt + answer + end-of-turn is up to {{longest}} tokens, so truncation at "
                        f"model.max_length {max_length} would cut the answer's end (and its end-of-turn token) in "
                        "training and scoring; raise model.max_length or shorten the prompt", n))
    return out


def _safe_reason(exc: Exception, e: Example) -> str:
    """The exception's type, and its message when it quotes nothing of the row (a template's own text)."""
    message = str(exc)
    texts = [m["content"] for m in e.prompt] if isinstance(e.prompt, list) else [e.prompt]
    texts += [e.chosen, e.rejected, e.id]
    if not message or len(message) > 200 or any(len(t) >= 3 and t in message for t in texts):
        return type(exc).__name__
    return f"{type(exc).__name__}: {message}"


def _rows_named(rows: list[Example]) -> str:
    named = rows[:MAX_ROWS_NAMED]
    more = f" and {len(rows) - len(named)} more" if len(rows) > len(named) else ""
    word = "row" if len(rows) == 1 else "rows"
    return (f"{word} {', '.join(str(e.row) for e in named)}{more} "
            f"(id{'s' if len(rows) > 1 else ''} {', '.join(e.id for e in named)}{more})")
