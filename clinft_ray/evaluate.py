"""Scoring a model on a split by the task's own metric, from the model's outputs.

Two ways to get a classification answer:
- `loglik` (default, fast): the label whose answer text (rendered exactly as in training, end-of-turn
  included) has the highest log-likelihood given the prompt;
- `generate`: greedy decoding of up to `max_new_tokens`, parsed to a label by `tasks.parse_label`.

`score_split` returns per-example outcomes (`id`, `correct`; the predicted label is kept in memory
only) and the aggregate metrics. No text leaves this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clinft_ray.config import TaskConfig
from clinft_ray.data import Example, as_messages
from clinft_ray.modeling import has_chat_template
from clinft_ray.tasks import classification_metrics, parse_label


@dataclass(frozen=True)
class Scored:
    metrics: dict[str, float]
    ids: list[str]
    correct: list[bool]


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


def loglik_predict(model: Any, tokenizer: Any, task: TaskConfig, examples: list[Example], max_length: int,
                   batch_size: int = 16) -> list[str]:
    """The most likely label for each example (sum of the answer's token log-probs)."""
    import torch

    pairs = []  # (example index, label index, input ids, number of answer tokens)
    for i, ex in enumerate(examples):
        for j, label in enumerate(task.labels):
            head, tail = render(tokenizer, ex.prompt, label)
            a = tokenizer(tail, add_special_tokens=False)["input_ids"]
            p = _prompt_ids(tokenizer, head, max_length - len(a))
            pairs.append((i, j, p + a, len(a)))
    scores = torch.full((len(examples), len(task.labels)), float("-inf"))
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
    return [task.labels[k] for k in scores.argmax(dim=1).tolist()]


def generate_predict(model: Any, tokenizer: Any, task: TaskConfig, examples: list[Example], max_length: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers parsed to labels."""
    import torch

    dev = next(model.parameters()).device
    preds: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [_prompt_ids(tokenizer, render(tokenizer, e.prompt)[0], max_length - task.max_new_tokens)
                   for e in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, p in enumerate(prompts):  # left padding, so every answer starts at column `width`
            input_ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=task.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        preds += [parse_label(t, task.labels) for t in texts]
    return preds


def score_split(model: Any, tokenizer: Any, task: TaskConfig, examples: list[Example], max_length: int) -> Scored:
    """Score `examples` by the task's metric; the model is put in eval mode and restored after."""
    was_training = model.training
    model.eval()
    try:
        predict = loglik_predict if task.scoring == "loglik" else generate_predict
        preds = predict(model, tokenizer, task, examples, max_length)
    finally:
        model.train(was_training)
    gold = [e.chosen for e in examples]
    return Scored(
        metrics=classification_metrics(task, gold, preds),
        ids=[e.id for e in examples],
        correct=[g == p for g, p in zip(gold, preds, strict=True)],
    )
