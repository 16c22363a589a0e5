"""A micro-batch as one row of its sequences end to end, without padding (`learner.pack_sequences`).

Right-padded rows spend compute on pad tokens: a micro-batch of lengths 900, 300 and 200 runs 2700 tokens
for 1400 real ones. Packed, the rows become one row [1, sum of lengths] whose ``position_ids`` restart at 0
for every sequence. Passed without an ``attention_mask`` (and without a cache), transformers reads the
restarts as sequence boundaries (``masking_utils.find_packed_sequence_indices``) and keeps attention inside
each sequence: a block-diagonal causal mask for eager and SDPA, a BlockMask for flex attention, and
variable-length kernels for flash attention (from ``position_ids``). `hidden.HiddenForward` makes that call.
Only flash and flex attention skip the masked-out blocks: eager and SDPA compute attention over the whole
packed row, [N x N] instead of a [T x T] per row, so there packing trades padding for attention work.

The per-token tensors keep the target-aligned layout (`losses.py`): index ``t`` describes token ``t+1`` of
the packed row. The slot at each boundary would have the last token of one sequence predict the first token
of the next: it gets mask 0 and the padding values, so it never carries loss. ``seq_index`` says which
sequence each slot belongs to, for the per-sequence sums of the loss (seq_mean, distillation's 1/|y|).
Pure torch on CPU tensors, built from `collate.collate`'s padded batch so both layouts hold the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from piplay_ray.learner.losses import LOG_FLOOR

ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")  # honour the restarts
_FILL = {"teacher_tail": LOG_FLOOR}  # a boundary slot's value where it is not 0 (as collate pads)


def pack(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """`collate`'s padded batch [B, T] -> one packed row: ``input_ids``, ``position_ids`` [1, N] (N = the sum
    of the lengths), every target-aligned tensor [1, N-1, ...] with boundary slots masked, and
    ``seq_index`` [1, N-1]; no ``attention_mask``."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    if any(n < 1 for n in lengths):
        raise ValueError("pack: every row needs at least one token")
    out = {"input_ids": torch.cat([batch["input_ids"][b, :n] for b, n in enumerate(lengths)])[None],
           "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
           "seq_index": torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)])[None, :-1]}
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask"):
            continue
        parts = []
        for b, n in enumerate(lengths):
            parts.append(value[b, : n - 1])  # sequence b's own slots: its tokens 1..n-1
            if b < len(lengths) - 1:  # the boundary slot: "predicts" the next sequence's first token
                parts.append(value.new_full((1, *value.shape[2:]), _FILL.get(key, 0)))
        out[key] = torch.cat(parts)[None]
    return out


def check_attention(config) -> None:
    """Packing needs an attention implementation (of a model's `config`) whose mask transformers derives from
    ``position_ids``; any other would silently let a sequence attend to the one before it."""
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ATTENTION:
        raise ValueError(f"learner.pack_sequences needs one of the attention implementations {ATTENTION}; "
                         f"the model uses {impl!r}")
