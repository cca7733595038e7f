"""Scoring a model on a split by the task's own metric, from the model's outputs.

Two ways to get a model's answer:
- `loglik` (classification and triage; default, fast): the candidate answer (a label, or a
  combination of triage labels written with the task's template) whose text, rendered exactly as in
  training with end-of-turn, has the highest log-likelihood given the prompt;
- `generate`: greedy decoding of up to `max_new_tokens`, then parsed (labels, option letters) or
  graded (normalized match, the judge) by `tasks`.

`score_split` returns per-example outcomes and the aggregate metrics. Generated text is kept in
memory only: no text leaves this module except to the configured judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clinft_ray.config import ClassificationTask, ReasoningTask, TaskConfig, TriageTask
from clinft_ray.data import Example, as_messages
from clinft_ray.modeling import has_chat_template
from clinft_ray.tasks import (
    classification_metrics,
    parse_label,
    parse_triage,
    prompt_text,
    reasoning_correct,
    rouge_l,
    triage_answers,
    triage_scores,
)


@dataclass(frozen=True)
class Scored:
    """Aggregate metrics, and per-example outcomes by name (bool: correct / incorrect, float: a
    score) in the order of `ids`."""

    metrics: dict[str, float]
    ids: list[str]
    outcomes: dict[str, list[Any]]
    answers: list[str]  # the model's answers: in memory only, logged only with mlflow.log_examples
    # Label outcomes only (classification, triage): outcome -> {"gold": [...], "prediction": [...]},
    # labels from the config (`tasks.NO_LABEL` for an unparseable answer), for the clinical metrics.
    labels: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def render(tokenizer: Any, prompt: Any, answer: str | None = None) -> tuple[str, str | None]:
    """(prompt text, answer text) as the model sees them: chat template when the model has one."""
    if not has_chat_template(tokenizer):
        return str(prompt), None if answer is None else answer + (tokenizer.eos_token or "")
    msgs = as_messages(prompt)
    head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if answer is None:
        return head, None
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently with an answer; use a prefix-stable template")
    return head, full[len(head) :]


def _prompt_ids(tokenizer: Any, text: str, budget: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return ids[-budget:] if budget > 0 else ids[-1:]  # keep the end of a long prompt: the question is there


def loglik_choose(model: Any, tokenizer: Any, examples: list[Example], answers: list[str], max_length: int,
                  batch_size: int = 16) -> list[int]:
    """For each example, the index of the most likely of `answers` (sum of the answer's token
    log-probs, the answer rendered exactly as in training, end-of-turn included)."""
    import torch

    pairs = []  # (example index, answer index, input ids, number of answer tokens)
    for i, ex in enumerate(examples):
        for j, answer in enumerate(answers):
            head, tail = render(tokenizer, ex.prompt, answer)
            a = tokenizer(tail, add_special_tokens=False)["input_ids"]
            p = _prompt_ids(tokenizer, head, max_length - len(a))
            pairs.append((i, j, p + a, len(a)))
    scores = torch.full((len(examples), len(answers)), float("-inf"))
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(ids) for _, _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, _, ids, _) in enumerate(chunk):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_lp = logp.gather(-1, input_ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1).cpu()
        for r, (i, j, ids, n_ans) in enumerate(chunk):
            scores[i, j] = tok_lp[r, len(ids) - 1 - n_ans : len(ids) - 1].sum()
    return scores.argmax(dim=1).tolist()


def generate(model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int, max_length: int,
             batch_size: int = 16) -> list[str]:
    """Greedy answers, decoded without special tokens."""
    import torch

    dev = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [_prompt_ids(tokenizer, render(tokenizer, e.prompt)[0], max_length - max_new_tokens) for e in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, p in enumerate(prompts):  # left padding, so every answer starts at column `width`
            input_ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
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
    return Scored(metrics=metrics, ids=[e.id for e in examples], outcomes=outcomes, answers=answers,
                  labels=predicted_labels(task, examples, answers))


def predicted_labels(task: TaskConfig, examples: list[Example], answers: list[str]) -> dict[str, dict[str, list[str]]]:
    """Gold and predicted label per example for each label outcome, parsed from the answers as the
    task's metrics parse them; empty for reasoning and summaries."""
    if isinstance(task, ClassificationTask):
        return {"correct": {"gold": [e.chosen for e in examples], "prediction": [parse_label(a, task.labels) for a in answers]}}
    if isinstance(task, TriageTask):
        gold = [parse_triage(e.chosen, task) for e in examples]
        pred = [parse_triage(a, task) for a in answers]
        return {f"correct_{n}": {"gold": [g[n] for g in gold], "prediction": [p[n] for p in pred]} for n in task.label_sets}
    return {}


def _score(model: Any, tok: Any, task: TaskConfig, examples: list[Example], max_length: int,
           judge: Any) -> tuple[dict[str, float], dict[str, list[Any]], list[str]]:
    def answers_by(candidates: list[str]) -> list[int]:
        return loglik_choose(model, tok, examples, candidates, max_length)

    def texts() -> list[str]:
        return generate(model, tok, examples, task.max_new_tokens, max_length)

    if isinstance(task, ClassificationTask):
        said = [task.labels[k] for k in answers_by(task.labels)] if task.scoring == "loglik" else texts()
        preds = [parse_label(t, task.labels) for t in said]
        gold = [e.chosen for e in examples]
        return (classification_metrics(task, gold, preds), {"correct": [g == p for g, p in zip(gold, preds, strict=True)]}, said)
    if isinstance(task, TriageTask):
        if task.scoring == "loglik":
            candidates = [task.template.format(**c) for c in triage_answers(task)]
            said = [candidates[k] for k in answers_by(candidates)]
        else:
            said = texts()
        return (*triage_scores(task, examples, [parse_triage(t, task) for t in said]), said)
    if isinstance(task, ReasoningTask):
        said = texts()
        correct = reasoning_correct(task, examples, said, judge)
        return {"accuracy": sum(correct) / len(correct)}, {"correct": correct}, said
    said = texts()
    ratings = judge.rate_summaries([prompt_text(e.prompt) for e in examples], [e.chosen for e in examples], said)
    rouge = [rouge_l(s, e.chosen) for s, e in zip(said, examples, strict=True)]
    return ({"judge": sum(ratings) / len(ratings), "rougeL": sum(rouge) / len(rouge)},
            {"score": [float(r) for r in ratings]}, said)


def data_problems(tokenizer: Any, splits: dict[str, tuple[Any, list[Example]]], max_length: int,
                  model_name: str) -> list[str]:
    """Checks that need the tokenizer (not the model): chat-formatted prompts for a model without a
    chat template, and training rows whose prompt alone fills `max_length`, so that truncation would
    remove the whole answer. `splits` maps split name -> (path, examples)."""
    problems = []
    chat = has_chat_template(tokenizer)
    for split, (path, examples) in splits.items():
        if not chat and any(not isinstance(e.prompt, str) for e in examples):
            problems.append(f"{path}: prompts are chat messages but the model {model_name} has no chat template; "
                            "use a chat/instruct model or plain-text prompts")
            continue
        if split not in ("train", "eval"):
            continue  # scoring keeps the end of a long prompt and the whole answer
        for e in examples:
            head, tail = render(tokenizer, e.prompt, e.chosen)
            n_prompt = len(tokenizer(head, add_special_tokens=not chat)["input_ids"])
            if n_prompt >= max_length:
                problems.append(f"{path}: id {e.id}: the prompt is {n_prompt} tokens, so truncation at "
                                f"model.max_length {max_length} would remove the whole answer; raise "
                                "model.max_length or shorten the prompt")
    return problems
