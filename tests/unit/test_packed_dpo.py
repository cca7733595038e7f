"""Prefix-shared DPO against stock TRL: same loss, rewards, metrics and gradients on the same weights and batch.

Both trainers get the same tiny Llama (fp32, CPU), the same perturbed policy weights (so that policy and
reference differ and the rewards are not all zero) and the same collated batch, whose pairs have
prompts and answers of different lengths (chosen longer than rejected and the other way round), so
the batch is padded in both layouts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from clinft_ray.packed_dpo import STRUCTURED, PackedDPOTrainer, pack_pairs, prefix_shared_attention

WORDS = ("the patient has fever cough pain no yes left right chest clear normal abnormal mild severe acute "
         "chronic denies reports").split()
TOL = {"rtol": 1e-5, "atol": 1e-6}
# Rewards and log-probs are sums over an answer's tokens (magnitude ~10-100) of float32 values added
# in another order by the packed layout: their rounding is ~1e-5 absolute, whatever the batch.
SUM_TOL = {"rtol": 1e-5, "atol": 2e-5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from clinft_ray.demo.tiny import build_tiny_model

    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus, vocab_size=300, hidden_size=32)


def preference_rows(n: int, seed: int, chat: bool = False) -> list[dict[str, Any]]:
    """Pairs with 1-24 prompt words and 1-6 answer words, chosen and rejected of independent lengths."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for _ in range(n):
        prompt, chosen, rejected = text(1, 24), text(1, 6), text(1, 6)
        if chat:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected + " no"}]})
        else:
            rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected + " no"})
    return rows


def make_trainer(cls: type, tiny: Path, rows: list[dict[str, Any]], *, lora: bool, loss_type: str = "sigmoid",
                 attn: str = "sdpa", max_length: int = 96, **config: Any) -> Any:
    """A trainer whose trainable weights are moved off the reference by the same seeded noise. Full
    fine-tuning gets a second load as its reference model, unless the rows carry precomputed values."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(tiny, attn_implementation=attn, dtype=torch.float32)

    args = DPOConfig(output_dir=str(tiny / "out"), use_cpu=True, bf16=False, report_to=[],
                     per_device_train_batch_size=len(rows),
                     per_device_eval_batch_size=3, max_length=max_length, beta=0.2, loss_type=[loss_type], seed=0,
                     disable_tqdm=True, **config)
    trainer = cls(
        model=load(),
        ref_model=None if lora or args.precompute_ref_log_probs else load(),
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear") if lora else None,
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(trainer.model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return trainer


def train_step(trainer: Any) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor], list[int]]:
    """Loss, logged metrics, gradients and the row counts the policy's embedding saw, for one batch
    through `Trainer.training_step` (the autocast context and backward the training loop uses)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    seen: list[int] = []
    hook = trainer.model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by `training_step`
    try:
        loss = trainer.training_step(trainer.model, batch)
    finally:
        hook.remove()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), metrics, grads, seen


def assert_same_step(stock: Any, packed: Any, pairs: int) -> None:
    loss, metrics, grads, _ = train_step(stock)
    p_loss, p_metrics, p_grads, p_seen = train_step(packed)
    assert p_seen and set(p_seen) == {pairs}, f"the packed trainer ran rows of sizes {p_seen}, not one per pair"
    assert metrics["rewards/chosen"] != 0.0 and metrics["rewards/margins"] != 0.0, "policy equals reference: weak test"
    torch.testing.assert_close(p_loss, loss, **TOL)
    assert metrics.keys() == p_metrics.keys()
    for key in metrics:
        tol = SUM_TOL if key.startswith(("rewards/", "logps/", "logits/")) else TOL
        torch.testing.assert_close(p_metrics[key], metrics[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
    assert grads.keys() == p_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(p_grads[name], grad, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_step_equals_stock_trl(tiny, lora, loss_type):
    from trl import DPOTrainer

    rows = preference_rows(5, seed=3)
    packed = make_trainer(PackedDPOTrainer, tiny, rows, lora=lora, loss_type=loss_type)
    assert_same_step(make_trainer(DPOTrainer, tiny, rows, lora=lora, loss_type=loss_type), packed, pairs=5)
    assert packed.model.config._attn_implementation == STRUCTURED, "sdpa is switched to the block-skipping kernel"


def test_packed_step_equals_stock_with_eager_attention_and_chat_rows(tiny):
    """The additive mask that eager attention reads, on conversational rows (the chat template)."""
    from trl import DPOTrainer

    rows = preference_rows(4, seed=5, chat=True)
    assert_same_step(make_trainer(DPOTrainer, tiny, rows, lora=True, attn="eager"),
                     make_trainer(PackedDPOTrainer, tiny, rows, lora=True, attn="eager"), pairs=4)


def test_packed_evaluation_equals_stock(tiny):
    """`evaluate()` (eval batches of 3 over 7 pairs, the last one short) logs the same eval metrics."""
    from trl import DPOTrainer

    rows = preference_rows(7, seed=11)
    stock = make_trainer(DPOTrainer, tiny, rows, lora=False).evaluate()
    packed = make_trainer(PackedDPOTrainer, tiny, rows, lora=False).evaluate()
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_logps/chosen"):
        assert packed[key] == pytest.approx(stock[key], rel=1e-5, abs=1e-6), key


def test_packing_layout_by_hand():
    """One pair: prompt `a b`, chosen `x`, rejected `y z` (ids a=1 b=2 x=3 y=4 z=5, pad 0).

    TRL's layout: chosen row `a b x <pad>`, rejected row `a b y z`. Packed: `a b x b' y z` at positions
    0 1 2 1 2 3, where b' is the copy of b that starts the rejected branch. Visibility (row = query):
        a : a            b': a b'
        b : a b          y : a b' y
        x : a b x        z : a b' y z
    Scored (next token of the same answer): b -> x, b' -> y, y -> z. TRL's chosen row reads packed
    positions 0 1 2, its rejected row 2 3 4 (past the chosen answer and the copy). The answer tokens
    (x b' y z, positions 2-5) are the queries that attend through the mask.
    """
    input_ids = torch.tensor([[1, 2, 3, 0], [1, 2, 4, 5]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 3, -100], [-100, -100, 4, 5]])
    packed = pack_pairs(input_ids, attention_mask, labels)
    assert packed is not None
    assert packed.input_ids.tolist() == [[1, 2, 3, 2, 4, 5]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 1, 2, 3]]
    assert packed.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
    ]
    assert packed.shift_labels.tolist() == [[-100, 3, -100, 4, 5, -100]]
    assert packed.source_cols.tolist() == [[0, 1, 2], [2, 3, 4]]
    assert packed.label_mask.tolist() == [[False, True, False], [False, True, True]]
    assert packed.layout.prompt == 2 and packed.layout.answer_index.tolist() == [[2, 3, 4, 5]]
    assert packed.layout.answer_slot.tolist() == [[-1, -1, 0, 1, 2, 3]]

    additive = pack_pairs(input_ids, attention_mask, labels, "additive", torch.float32).attention_mask
    assert torch.equal(additive == 0, packed.attention_mask)


def test_block_skipping_attention_equals_masked_sdpa():
    """Three pairs of different prompt and answer lengths (so rows are padded, and a short prompt's row
    has answer tokens before the longest prompt ends), grouped-query heads
    (4 query heads on 2 key/value heads): the per-segment attention equals `sdpa` with the packed mask on
    every real position, and so do the gradients of query, key and value."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    pairs = [(5, 2, 3), (1, 4, 1), (7, 1, 2)]  # prompt, chosen, rejected
    length = max(p + max(c, r) for p, c, r in pairs)
    input_ids = torch.zeros(6, length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (p, c, r) in enumerate(pairs):
        prompt = torch.randint(1, 50, (p,))
        for row, n in ((i, c), (3 + i, r)):
            input_ids[row, : p + n] = torch.cat([prompt, torch.randint(1, 50, (n,))])
            attention_mask[row, : p + n] = 1
            labels[row, p : p + n] = input_ids[row, p : p + n]
    packed = pack_pairs(input_ids, attention_mask, labels)
    width = packed.input_ids.shape[1]
    q, k, v = (torch.randn(3, h, width, 8, requires_grad=True) for h in (4, 2, 2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False

    def run(fn: Any, **kw: Any) -> tuple[torch.Tensor, ...]:
        out, _ = fn(module, q, k, v, packed.attention_mask, scaling=0.3, **kw)
        real = torch.tensor([[j < p + c + 1 + r for j in range(width)] for p, c, r in pairs])
        out = out[real]
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
        return out, *grads

    expected = run(sdpa_attention_forward)
    for got, want in zip(run(prefix_shared_attention, prefix_shared=packed.layout), expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_batches_that_do_not_share_their_prompt_are_not_packed():
    """`keep_end` truncation can cut chosen and rejected prompts differently; an empty prompt leaves the
    first answer token without a predictor. Both go to the unpacked forward (None)."""
    attention_mask = torch.ones(2, 4, dtype=torch.long)
    labels = torch.tensor([[-100, -100, 3, 3], [-100, -100, 4, 5]])
    assert pack_pairs(torch.tensor([[1, 2, 3, 3], [1, 9, 4, 5]]), attention_mask, labels) is None
    assert pack_pairs(torch.tensor([[3, 3, 3, 3], [4, 5, 4, 5]]), attention_mask, torch.tensor([[3] * 4, [4] * 4])) is None


# Reference log-probs computed once (clinft_ray.reference) ------------------------------------------


def reference_args(tiny: Path, batch_size: int, max_length: int = 96, **config: Any) -> Any:
    from trl import DPOConfig

    return DPOConfig(output_dir=str(tiny / "out"), use_cpu=True, bf16=False, report_to=[], max_length=max_length,
                     precompute_ref_batch_size=batch_size, disable_tqdm=True, **config)


def load_reference(tiny: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)


def test_cached_reference_equals_fresh_and_stock_and_second_call_runs_no_forward(tiny, tmp_path):
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from clinft_ray.reference import REF_COLUMNS, cached_reference_logps, compute_reference_logps

    tok = AutoTokenizer.from_pretrained(tiny)
    splits = {"train": preference_rows(7, seed=1), "eval": preference_rows(3, seed=2)}
    forwards = []

    def compute() -> Any:
        model = load_reference(tiny)
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: forwards.append(out.shape))
        return compute_reference_logps(model, tok, splits, reference_args(tiny, batch_size=3))

    key = {"checkpoint": str(tiny), "max_length": 96}
    first = cached_reference_logps(tmp_path / "cache", key, compute)
    assert forwards and {shape[0] for shape in forwards} <= {3, 1}, "one packed row per pair, batches of 3"
    forwards.clear()
    again = cached_reference_logps(tmp_path / "cache", key, compute)
    assert forwards == [] and again == first
    fresh = compute()
    assert fresh == first
    assert len(list((tmp_path / "cache").iterdir())) == 1, "one cache file, no temporary left behind"

    # Stock TRL's own (unpacked) precompute gives the same numbers.
    from datasets import Dataset

    stock = DPOTrainer(model=load_reference(tiny), args=reference_args(tiny, 3, precompute_ref_log_probs=True),
                       train_dataset=Dataset.from_list(splits["train"]), processing_class=tok)
    for col in REF_COLUMNS:
        torch.testing.assert_close(torch.tensor(first["train"][col]), torch.tensor(stock.train_dataset[col]), **TOL)


def test_no_whole_model_hash_in_a_reference_pass_or_a_trial(tiny, monkeypatch):
    """TRL hashes every weight when `precompute_ref_log_probs` is on (a minute for an 8B model);
    neither clinft-ray's reference pass nor a trial with the shared reference does."""
    import trl.trainer.dpo_trainer as stock
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from clinft_ray.reference import compute_reference_logps, with_reference

    hashed = []
    monkeypatch.setattr(stock, "hash_module", lambda module: hashed.append(module) or "h")
    rows, tok = preference_rows(3, seed=4), AutoTokenizer.from_pretrained(tiny)
    values = compute_reference_logps(load_reference(tiny), tok, {"train": rows}, reference_args(tiny, batch_size=3))
    trial = make_trainer(PackedDPOTrainer, tiny, with_reference(rows, values["train"]), lora=True,
                         precompute_ref_log_probs=True)
    assert hashed == [] and len(trial._precompute_model_hash) == 32
    DPOTrainer(model=load_reference(tiny), args=reference_args(tiny, 3, precompute_ref_log_probs=True),
               train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert len(hashed) == 1, "stock TRL hashes the model (the spy sees it)"


def test_dpo_step_with_cached_reference_equals_live_reference(tiny, tmp_path):
    """Full fine-tuning: the cached trainer keeps no reference model at all, and its step (loss,
    rewards, gradients) equals stock TRL computing the reference live."""
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from clinft_ray.reference import cached_reference_logps, compute_reference_logps, with_reference

    rows = preference_rows(5, seed=3)
    tok = AutoTokenizer.from_pretrained(tiny)
    values = cached_reference_logps(tmp_path, {"k": 1}, lambda: compute_reference_logps(
        load_reference(tiny), tok, {"train": rows}, reference_args(tiny, batch_size=2)))
    cached = make_trainer(PackedDPOTrainer, tiny, with_reference(rows, values["train"]), lora=False,
                          precompute_ref_log_probs=True)
    assert cached.ref_model is None
    assert_same_step(make_trainer(DPOTrainer, tiny, rows, lora=False), cached, pairs=5)


def test_rows_trl_drops_get_no_reference_value(tiny):
    """A prompt that fills max_length is dropped by TRL; its reference value is None, and the other
    rows keep theirs in order."""
    from transformers import AutoTokenizer

    from clinft_ray.reference import compute_reference_logps

    rows = preference_rows(3, seed=4)
    rows.insert(1, {"prompt": " ".join(WORDS * 3), "chosen": " yes", "rejected": " no"})
    values = compute_reference_logps(load_reference(tiny), AutoTokenizer.from_pretrained(tiny), {"train": rows},
                                     reference_args(tiny, batch_size=2, max_length=40))
    chosen = values["train"]["ref_chosen_logps"]
    assert chosen[1] is None and all(isinstance(v, float) and v < 0 for i, v in enumerate(chosen) if i != 1)


def test_a_failed_writer_leaves_no_cache_and_a_stale_key_is_recomputed(tmp_path):
    from clinft_ray.reference import cached_reference_logps

    def killed() -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_reference_logps(tmp_path, {"k": 1}, killed)
    assert list(tmp_path.iterdir()) == []
    values = {"train": {"ref_chosen_logps": [-1.5], "ref_rejected_logps": [-2.5]}}
    assert cached_reference_logps(tmp_path, {"k": 1}, lambda: values) == values
    (path,) = tmp_path.iterdir()
    path.write_text(path.read_text().replace('"k": 1', '"k": 2'))  # a file that holds another key
    other = {"train": {"ref_chosen_logps": [-3.0], "ref_rejected_logps": [-4.0]}}
    assert cached_reference_logps(tmp_path, {"k": 1}, lambda: other) == other


def test_checkpoint_fingerprint_follows_the_checkpoint(tiny, tmp_path):
    import shutil
    import time

    from clinft_ray.reference import checkpoint_fingerprint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt, ignore=shutil.ignore_patterns("out"))
    (ckpt / "clinft_checkpoint.json").write_text('{"step": 10}')
    before = checkpoint_fingerprint(ckpt)
    assert checkpoint_fingerprint(str(ckpt)) == before
    (ckpt / "clinft_checkpoint.json").write_text('{"step": 20}')
    assert checkpoint_fingerprint(ckpt) != before
    after_manifest = checkpoint_fingerprint(ckpt)
    time.sleep(0.01)
    load_reference(tiny).save_pretrained(ckpt)  # the same path rewritten (a re-run into the same storage)
    assert checkpoint_fingerprint(ckpt) != after_manifest


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["mistral", "llama3"])
def test_packed_step_equals_stock_trl_on_real_tokenizers(real_models, family, lora):
    """The paper's tokenizers and chat templates (Mistral-7B-Instruct-v0.2, Llama-3-Instruct) on tiny
    random models of their architectures: same loss, rewards and gradients as stock TRL."""
    from trl import DPOTrainer

    rows = preference_rows(4, seed=7, chat=True)
    model = real_models[family]
    assert_same_step(make_trainer(DPOTrainer, model, rows, lora=lora),
                     make_trainer(PackedDPOTrainer, model, rows, lora=lora), pairs=4)


@pytest.mark.parametrize("family", ["mistral", "llama3"])
def test_packed_step_equals_stock_trl_on_rows_truncation_cuts(real_models, family):
    """`max_length` 2 tokens past the longest prompt: the answers that run past it are cut (and lose
    their end-of-turn token) as TRL's `keep_start` cuts them; packed and stock still agree."""
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from clinft_ray.evaluate import row_tokens

    model = real_models[family]
    tok = AutoTokenizer.from_pretrained(model)
    rows = preference_rows(4, seed=7, chat=True)
    tokens = [row_tokens(tok, r["prompt"], r[k][0]["content"]) for r in rows for k in ("chosen", "rejected")]
    max_length = max(len(t.prompt) for t in tokens) + 2
    cut = sum(len(t.prompt) + len(t.answer) > max_length for t in tokens)
    assert cut >= 3, f"only {cut} of {len(tokens)} answers are cut: a weak test"
    assert_same_step(make_trainer(DPOTrainer, model, rows, lora=False, max_length=max_length),
                     make_trainer(PackedDPOTrainer, model, rows, lora=False, max_length=max_length), pairs=4)


@pytest.mark.parametrize("family", ["mistral", "llama3"])
def test_shared_reference_equals_live_on_real_tokenizers(real_models, family, tmp_path):
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from clinft_ray.reference import compute_reference_logps, with_reference

    model = real_models[family]
    rows = preference_rows(4, seed=9, chat=True)
    values = compute_reference_logps(load_reference(model), AutoTokenizer.from_pretrained(model), {"train": rows},
                                     reference_args(model, batch_size=2))
    cached = make_trainer(PackedDPOTrainer, model, with_reference(rows, values["train"]), lora=False,
                          precompute_ref_log_probs=True)
    assert_same_step(make_trainer(DPOTrainer, model, rows, lora=False), cached, pairs=4)
