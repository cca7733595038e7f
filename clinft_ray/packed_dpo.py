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
autograd graph, which the `Cache` classes are not built for. The mask is boolean for `sdpa` and
additive (0 / dtype min) for `eager`, the formats those kernels read. Other attention kernels
(flash-attention, flex) cannot take an arbitrary mask; with them, and for anything the packing does not
cover (prompt-learning PEFT, MoE router losses, vision inputs, a batch whose chosen and rejected rows do
not share their prompt, e.g. after `keep_end` truncation), the batch goes through the stock unpacked
forward, so results stay the same, only slower.

`PackedDPOTrainer` overrides only where TRL calls the model: `_compute_loss` hands TRL a model that
packs (and gives the reference log-probs to TRL as if precomputed), and `compute_ref_log_probs` packs
the reference forward. Everything else, losses, `rewards/*`, `logps/*`, eval, LoRA with the adapter
disabled as reference, callbacks, is TRL's code. Batches whose rows carry `ref_chosen_logps` and
`ref_rejected_logps` with `precompute_ref_log_probs=True` use them as TRL does; datasets that already
hold these columns are not recomputed (see `clinft_ray.reference` for the shared on-disk cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate.utils import is_peft_model
from transformers.utils import logging
from trl import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

logger = logging.get_logger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
MaskFormat = Literal["bool", "additive"]
# What each attention implementation reads as a custom 4D mask; others fall back to the unpacked forward.
MASK_FORMATS: dict[str, MaskFormat] = {"sdpa": "bool", "eager": "additive"}
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

for _hook in ("_compute_loss", "compute_ref_log_probs", "_precompute_ref_logps"):
    if not hasattr(DPOTrainer, _hook):
        raise ImportError(f"trl's DPOTrainer has no {_hook}; PackedDPOTrainer is written against trl 1.16")


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
    return PackedPairs(packed_ids, visible, position_ids, shift_labels, source_rows, source_cols, answer[:, 1:])


class PrefixSharedForward:
    """Stands in for the model where TRL calls it: a fused-LM-head call on a preference batch runs
    packed (`pack_pairs`) and answers in TRL's layout; every other call goes to the model as is."""

    def __init__(self, model: Any, mask_format: MaskFormat | None, mask_dtype: torch.dtype):
        self.model, self.mask_format, self.mask_dtype = model, mask_format, mask_dtype

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        packed = None
        if fused_lm_head and self.mask_format and input_ids is not None and labels is not None and set(kwargs) <= {
            "use_cache"
        }:
            packed = pack_pairs(input_ids, attention_mask, labels, self.mask_format, self.mask_dtype)
        if packed is None:
            if fused_lm_head:
                kwargs.update(labels=labels, fused_lm_head=True)
            elif labels is not None:
                kwargs["labels"] = labels
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out = self.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                         position_ids=packed.position_ids, shift_labels=packed.shift_labels, fused_lm_head=True,
                         use_cache=False)
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

    def _prefix_shared(self, model: Any) -> PrefixSharedForward:
        """`model` wrapped to run packed when its attention implementation takes a custom 4D mask."""
        unwrapped = self.accelerator.unwrap_model(model)
        impl = getattr(unwrapped.config, "_attn_implementation", None)
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
