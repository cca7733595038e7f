"""Prefix-shared DPO: the prompt is run once per preference pair instead of twice.

TRL's `DPOTrainer` runs `prompt + chosen` and `prompt + rejected` as two rows, so every prompt token is
computed twice, in the policy and again in the reference. For clinical tasks the prompt (a note, a
report) is long and the answer short, so DPO costs about twice SFT. `PackedDPOTrainer` packs each pair
into one row and computes the prompt once:

    tokens     p0 p1 .. pP-1 | c0 .. cC-1 | pP-1' r0 .. rR-1
    positions  0  1  .. P-1  | P  .. P+C-1 | P-1   P  .. P+R-1
    sees       prompt        | prompt, earlier chosen | prompt[:P-1], itself, earlier rejected

`pP-1'` is a copy of the last prompt token at the same position: it sees exactly what the original
sees (the prompt before it, and keys/values equal to its own), so its hidden state is the same. It is
there so that every answer token has its predictor right before it in the row, which lets TRL's own
fused LM head (`add_fused_lm_head`, called with pre-shifted `shift_labels`) score the packed row
unchanged: same kernel, same temperature and logit scaling, and on GPUs only the answer positions
are projected. The rejected branch does not see the original last prompt token (the copy stands in
for it), so no key is counted twice. The cost is one token per pair.

Why a 4D attention mask and not a shared KV cache: transformers 5.23 passes a 4D mask through
unchanged (`masking_utils._preprocess_mask_arguments` returns it as-is) to Llama's `sdpa` and `eager`
attention, which is one forward and one backward over `P + C + 1 + R` tokens, with gradients through the
prompt from both answers for free. A cached prompt would need the cache expanded and kept in the
autograd graph, which the `Cache` classes are not built for (and transformers turns the cache off under
activation checkpointing). The mask is boolean for `sdpa` and additive (0 / dtype min) for `eager`, the
formats those kernels read.

A dense mask makes the kernel compute every query-key block, twice the work of the causal prompt that
SFT runs with `is_causal`. So a model on `sdpa` is switched to `sdpa_prefix_shared`
(`prefix_shared_attention`), registered with transformers' `AttentionInterface`: on a packed call (the
layout arrives as the `prefix_shared` keyword, through PEFT, DDP and activation checkpointing) it runs
the prompt with `is_causal` and each answer against its own keys, which is the masked attention without
its empty blocks; on every other call (generation, scoring, the unpacked fallback) it is plain `sdpa`.
The switch is not saved with the model (`config.json` has no attention implementation).

Other attention kernels (flash-attention, flex) cannot take an arbitrary mask; with them, and for
anything the packing does not cover (prompt-learning PEFT, MoE router losses, vision inputs, a batch whose
chosen and rejected rows do not share their prompt, e.g. after `keep_end` truncation), the batch goes
through the stock unpacked forward, so results stay the same, only slower.

`PackedDPOTrainer` overrides only where TRL calls the model: `_compute_loss` hands TRL a model that
packs (and gives the reference log-probs to TRL as if precomputed), and `compute_ref_log_probs` packs
the reference forward. Everything else, losses, `rewards/*`, `logps/*`, eval, LoRA with the adapter
disabled as reference, callbacks, is TRL's code. Batches whose rows carry `ref_chosen_logps` and
`ref_rejected_logps` with `precompute_ref_log_probs=True` use them as TRL does; datasets that already
hold these columns are not recomputed (see `clinft_ray.reference` for the shared on-disk cache).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging
from trl import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

logger = logging.get_logger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
MaskFormat = Literal["bool", "additive"]
# What each attention implementation reads as a custom 4D mask; others fall back to the unpacked forward.
STRUCTURED = "sdpa_prefix_shared"
MASK_FORMATS: dict[str, MaskFormat] = {"sdpa": "bool", STRUCTURED: "bool", "eager": "additive"}
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

for _hook in ("_compute_loss", "compute_ref_log_probs", "_precompute_ref_logps"):
    if not hasattr(DPOTrainer, _hook):
        raise ImportError(f"trl's DPOTrainer has no {_hook}; PackedDPOTrainer is written against trl 1.16")


@dataclass(frozen=True)
class PrefixLayout:
    """Where the answers sit in a packed batch, for `prefix_shared_attention`."""

    prompt: int  # the longest prompt: every position before it that is not an answer token is a prompt token
    answer_index: torch.Tensor  # [B, A]: packed positions of each row's answer tokens (both branches), 0 after
    answer_slot: torch.Tensor  # [B, T]: each position's column in `answer_index`, -1 for prompt and padding


@dataclass(frozen=True)
class PackedPairs:
    """A batch of preference pairs packed one pair per row, and how to map its per-token outputs back
    to TRL's layout (chosen rows then rejected rows, `[2B, L]`, output at `j` scoring token `j + 1`)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, 1, T, T], bool (True = attend) or additive
    position_ids: torch.Tensor  # [B, T]
    shift_labels: torch.Tensor  # [B, T]: the token position j predicts, -100 where nothing is scored
    source_rows: torch.Tensor  # [2B, 1]: packed row of each TRL row
    source_cols: torch.Tensor  # [2B, L - 1]: packed position of each TRL position
    label_mask: torch.Tensor  # [2B, L - 1]: TRL's scored positions
    layout: PrefixLayout

    def unpack(self, packed: Any) -> FusedCausalLMOutput:
        """The fused LM head's packed outputs in TRL's layout, zero where TRL scores nothing."""
        fields = {}
        for name in _PER_TOKEN:
            value = getattr(packed, name)
            if value is not None:
                value = value[self.source_rows, self.source_cols]
                value = torch.where(self.label_mask, value, torch.zeros_like(value))
            fields[name] = value
        loss = -fields["log_probs"].sum() / self.label_mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, label_mask=self.label_mask, **fields)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               mask_format: MaskFormat = "bool", mask_dtype: torch.dtype = torch.float32) -> PackedPairs | None:
    """Pack TRL's preference batch (`DataCollatorForPreference` layout: `B` chosen rows then `B`
    rejected rows, right-padded, `labels` -100 outside the answer) one pair per row.

    Returns None when the batch is not in that layout or a pair's rows do not start with the same
    non-empty prompt; the caller then runs the unpacked forward.
    """
    rows, length = input_ids.shape
    if rows % 2 or length < 2:
        return None
    pairs = rows // 2
    span = torch.arange(length, device=input_ids.device)
    lengths = attention_mask.sum(dim=1)
    answer = labels != -100
    prompt = lengths - answer.sum(dim=1)
    real = span < lengths[:, None]
    if not (torch.equal(attention_mask.bool(), real) and torch.equal(answer, real & (span >= prompt[:, None]))):
        return None
    prompt, chosen_len, rejected_len = prompt[:pairs], answer[:pairs].sum(1), answer[pairs:].sum(1)
    shared = span < prompt[:, None]
    if not torch.equal(prompt, lengths[pairs:] - rejected_len) or bool((prompt < 1).any()):
        return None
    if not torch.equal(input_ids[:pairs][shared], input_ids[pairs:][shared]):
        return None

    ids, positions, branches = [], [], []
    for i, (p, c, r) in enumerate(zip(prompt.tolist(), chosen_len.tolist(), rejected_len.tolist(), strict=True)):
        # prompt | chosen | copy of the last prompt token | rejected
        ids.append(torch.cat([input_ids[i, : p + c], input_ids[i, p - 1 : p], input_ids[pairs + i, p : p + r]]))
        positions.append(torch.cat([span[: p + c], span[p - 1 : p + r]]))
        branches.append(torch.tensor([0] * p + [1] * c + [2] * (1 + r), device=input_ids.device))
    packed_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0)
    position_ids = torch.nn.utils.rnn.pad_sequence(positions, batch_first=True, padding_value=0)
    branch = torch.nn.utils.rnn.pad_sequence(branches, batch_first=True, padding_value=3)  # 3: padding
    width = packed_ids.size(1)
    cols = torch.arange(width, device=input_ids.device)
    copy_at = (prompt + chosen_len)[:, None]  # where the copy of the last prompt token sits

    # Who sees whom: causal, within a branch; the chosen branch also sees the whole prompt, the rejected
    # branch the prompt without its last token (its copy stands in). Padding sees only earlier padding.
    q, k = branch[:, :, None], branch[:, None, :]
    prompt_key = k == 0
    visible = (q == k) | (prompt_key & (q == 1)) | (prompt_key & (q == 2) & (cols < prompt[:, None] - 1)[:, None, :])
    visible &= cols[None, :, None] >= cols[None, None, :]
    visible = visible[:, None]
    if mask_format == "additive":
        visible = torch.zeros(visible.shape, dtype=mask_dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(mask_dtype).min
        )

    scored = ((branch == 1) | (branch == 2)) & (cols != copy_at)
    shift_labels = torch.full_like(packed_ids, -100)
    shift_labels[:, :-1] = torch.where(scored[:, 1:], packed_ids[:, 1:], -100)

    # TRL position j of a chosen row is packed position j; of a rejected row, j + C + 1 (past the chosen
    # answer and the copy).
    offset = torch.cat([torch.zeros_like(chosen_len), chosen_len + 1])
    source_cols = (span[None, :-1] + offset[:, None]).clamp(max=width - 1)
    source_rows = torch.arange(rows, device=input_ids.device)[:, None] % pairs

    # The answer tokens of each row (chosen, the copy, rejected), in order, and each position's slot among them.
    in_answer = (branch == 1) | (branch == 2)
    count = in_answer.sum(dim=1)
    slots = torch.arange(int(count.max()), device=input_ids.device)
    answer_index = torch.sort((~in_answer).int(), dim=1, stable=True).indices[:, : slots.numel()]
    answer_index = answer_index.masked_fill(slots[None, :] >= count[:, None], 0)
    answer_slot = torch.where(in_answer, in_answer.cumsum(dim=1) - 1, -1)
    layout = PrefixLayout(int(prompt.max()), answer_index, answer_slot)
    return PackedPairs(packed_ids, visible, position_ids, shift_labels, source_rows, source_cols, answer[:, 1:],
                       layout)


def prefix_shared_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            prefix_shared: PrefixLayout | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """`sdpa` attention that, on a packed batch (`prefix_shared` set), skips the blocks the packed mask
    hides: the prompts attend causally (`is_causal`, the kernels' fast path, over the longest prompt), and
    only the answer tokens, gathered, attend through the mask. Equal to `sdpa` with `pack_pairs`' mask;
    plain `sdpa` without `prefix_shared`."""
    if prefix_shared is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is None or attention_mask.dtype != torch.bool:
        raise ValueError("prefix_shared_attention needs pack_pairs' boolean 4D mask")
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    batch, heads, width, dim = query.shape
    p = prefix_shared.prompt
    # Positions before the longest prompt's end: causal attention is right for every prompt token there;
    # the answer tokens among them (rows with shorter prompts) are replaced below.
    prompt_out = F.scaled_dot_product_attention(query[:, :, :p], key[:, :, :p], value[:, :, :p], dropout_p=dropout,
                                                is_causal=True, scale=scaling)
    prompt_out = torch.cat([prompt_out, prompt_out.new_zeros(batch, heads, width - p, dim)], dim=2)
    index = prefix_shared.answer_index[:, None, :, None]
    answer_q = query.gather(2, index.expand(-1, heads, -1, dim))
    answer_mask = attention_mask.gather(2, index.expand(-1, 1, -1, width))
    answer_out = F.scaled_dot_product_attention(answer_q, key, value, attn_mask=answer_mask, dropout_p=dropout,
                                                scale=scaling)
    slot = prefix_shared.answer_slot
    spread = answer_out.gather(2, slot.clamp(min=0)[:, None, :, None].expand(-1, heads, -1, dim))
    out = torch.where((slot >= 0)[:, None, :, None], spread, prompt_out)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(STRUCTURED, prefix_shared_attention)
AttentionMaskInterface.register(STRUCTURED, sdpa_mask)


class PrefixSharedForward:
    """Stands in for the model where TRL calls it: a fused-LM-head call on a preference batch runs
    packed (`pack_pairs`) and answers in TRL's layout; every other call goes to the model as is."""

    def __init__(self, model: Any, mask_format: MaskFormat | None, mask_dtype: torch.dtype):
        self.model, self.mask_format, self.mask_dtype = model, mask_format, mask_dtype

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        packed = None
        # Only TRL's log-prob call on a plain text batch; extra inputs (router logits, images) go unpacked.
        plain = input_ids is not None and attention_mask is not None and labels is not None and set(kwargs) <= {
            "use_cache"}
        if fused_lm_head and self.mask_format is not None and plain:
            packed = pack_pairs(input_ids, attention_mask, labels, self.mask_format, self.mask_dtype)
        if packed is None:
            if fused_lm_head:
                kwargs.update(labels=labels, fused_lm_head=True)
            elif labels is not None:
                kwargs["labels"] = labels
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out = self.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                         position_ids=packed.position_ids, shift_labels=packed.shift_labels, fused_lm_head=True,
                         use_cache=False, prefix_shared=packed.layout)
        return packed.unpack(out)


@contextlib.contextmanager
def _reference_from_batch(trainer: DPOTrainer) -> Iterator[None]:
    """While TRL computes the loss, have it read the reference log-probs from the batch (where
    `_compute_loss` put them) instead of running its own, unpacked, reference forward."""
    saved = trainer.precompute_ref_logps
    trainer.precompute_ref_logps = True
    try:
        yield
    finally:
        trainer.precompute_ref_logps = saved


class PackedDPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer` with each pair's prompt computed once (see the module docstring); a drop-in
    replacement with the same arguments, losses, metrics and results to floating-point tolerance."""

    _warned: bool = False

    def __init__(self, *args: Any, **kwargs: Any):
        # With `precompute_ref_log_probs`, TRL's `__init__` hashes every parameter of the model
        # (`hash_module`: a copy to CPU, an fp32 upcast and SHA-256 of all weights, about a minute
        # for an 8B model) only to name its own cache file of reference values. clinft-ray keys its
        # reference cache by checkpoint fingerprint (`reference.checkpoint_fingerprint`) and hands
        # trials the columns, so each trainer gets a fresh random name instead: TRL's cache is never
        # reused across trainers, which is all it loses.
        import trl.trainer.dpo_trainer as stock

        hash_module, stock.hash_module = stock.hash_module, lambda module: uuid.uuid4().hex
        try:
            super().__init__(*args, **kwargs)
        finally:
            stock.hash_module = hash_module
        # Given a PeftModel and no reference model, TRL adds a "ref" adapter, a copy of "default", to
        # compute the reference with. With the reference precomputed (now done) it is never used; it
        # would be saved in every checkpoint, and with adapters stacked below "default" (a DPO adapter
        # on a frozen SFT adapter) it would not even be the reference.
        if self.precompute_ref_logps and is_peft_model(self.model) and "ref" in self.model.peft_config:
            self.model.delete_adapter("ref")

    def _prefix_shared(self, model: Any) -> PrefixSharedForward:
        """`model` wrapped to run packed when its attention implementation takes a custom 4D mask."""
        unwrapped = self.accelerator.unwrap_model(model)
        impl = getattr(unwrapped.config, "_attn_implementation", None)
        if impl == "sdpa":  # the same attention without the empty blocks of the packed mask
            base = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
            base.set_attn_implementation(STRUCTURED)
            impl = base.config._attn_implementation
        mask_format = MASK_FORMATS.get(impl)
        if is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning:
            mask_format = None  # virtual tokens are prepended to the row: the packed mask would not fit
        if mask_format is None and not self._warned:
            self._warned = True
            logger.warning(f"PackedDPOTrainer: attention {impl!r} or this PEFT method cannot take a custom 4D mask; "
                           "using the unpacked forward (same results, prompt computed twice)")
        return PrefixSharedForward(model, mask_format, unwrapped.get_input_embeddings().weight.dtype)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's reference log-probs (adapter disabled or reference model, no grad), packed."""
        return super().compute_ref_log_probs(self._prefix_shared(model), inputs)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        if not self.precompute_ref_logps:
            reference = self.ref_model if self.ref_model is not None else self.model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
            inputs = {**inputs, REF_COLUMNS[0]: ref_chosen, REF_COLUMNS[1]: ref_rejected}
        with _reference_from_batch(self):
            return super()._compute_loss(self._prefix_shared(model), inputs, return_outputs)

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """Datasets that already carry the reference columns (a shared cache) are used as they are."""
        if set(REF_COLUMNS) <= set(getattr(dataset, "column_names", None) or ()):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)
