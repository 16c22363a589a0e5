"""Experiences as one right-padded batch of target-aligned tensors (the layout `losses.py` describes).

``input_ids`` [B, T] hold prompt then response; every per-token tensor is [B, T-1], index ``t`` describing the
token ``input_ids[:, t+1]``. Teacher top-K rows go where the student generated the token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from piplay_ray.learner.losses import LOG_FLOOR
from piplay_ray.records import Experience


def collate(experiences: Sequence[Experience], pad_id: int) -> dict[str, Tensor]:
    """Right-pad experiences into one batch of target-aligned tensors (see the module docstring).

    Keys: ``input_ids``, ``attention_mask`` [B, T]; ``mask``, ``old_logprobs``, ``advantages`` [B, T-1];
    when any experience carries teacher top-K: ``teacher_ids``, ``teacher_logprobs`` [B, T-1, K] and
    ``teacher_mask`` [B, T-1] (1 where a teacher distribution exists and mask is 1), plus ``teacher_tail``
    [B, T-1] when every such experience has a tail; ``ref_logprobs`` [B, T-1] when every experience has
    ``info["ref_logprobs"]`` (response-aligned, like ``logprobs``).
    """
    if not experiences:
        raise ValueError("collate: no experiences")
    for i, e in enumerate(experiences):
        n = len(e.response_ids)
        if not e.prompt_ids:
            raise ValueError(f"collate: experience {i} has an empty prompt")
        if len(e.mask) != n or len(e.logprobs) != n:
            raise ValueError(f"collate: experience {i}: response_ids ({n}), mask ({len(e.mask)}) and "
                             f"logprobs ({len(e.logprobs)}) must have the same length")
    B = len(experiences)
    T = max(e.num_tokens for e in experiences)
    if T < 2:
        raise ValueError("collate: every sequence has a single token; nothing to predict")
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T - 1), dtype=torch.float32)
    old_logprobs = torch.zeros((B, T - 1), dtype=torch.float32)
    advantages = torch.zeros((B, T - 1), dtype=torch.float32)
    for b, e in enumerate(experiences):
        p, n = len(e.prompt_ids), len(e.response_ids)
        input_ids[b, : p + n] = torch.tensor(e.prompt_ids + e.response_ids, dtype=torch.long)
        attention_mask[b, : p + n] = 1
        # response token i sits at sequence position p+i and is predicted at aligned index p+i-1
        mask[b, p - 1 : p - 1 + n] = torch.tensor(e.mask, dtype=torch.float32)
        old_logprobs[b, p - 1 : p - 1 + n] = torch.tensor(e.logprobs, dtype=torch.float32)
        advantages[b, :] = float(e.advantage)
    old_logprobs *= mask
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask,
             "old_logprobs": old_logprobs, "advantages": advantages}
    batch.update(_collate_teacher(experiences, mask, T))
    if all("ref_logprobs" in e.info for e in experiences):
        ref = torch.zeros((B, T - 1), dtype=torch.float32)
        for b, e in enumerate(experiences):
            p, n = len(e.prompt_ids), len(e.response_ids)
            if len(e.info["ref_logprobs"]) != n:
                raise ValueError(f"collate: experience {b}: ref_logprobs must have one entry per response token")
            ref[b, p - 1 : p - 1 + n] = torch.tensor(e.info["ref_logprobs"], dtype=torch.float32)
        batch["ref_logprobs"] = ref * mask
    return batch


def _collate_teacher(experiences: Sequence[Experience], mask: Tensor, T: int) -> dict[str, Tensor]:
    with_teacher = [e for e in experiences if e.teacher_ids is not None]
    if not with_teacher:
        return {}
    ks = {len(row) for e in with_teacher for row in e.teacher_ids if row}
    if len(ks) > 1:
        raise ValueError(f"collate: teacher top-K rows have different sizes {sorted(ks)}")
    if not ks:
        return {}
    K = ks.pop()
    has_tail = all(e.teacher_tail is not None for e in with_teacher)
    B = len(experiences)
    ids = torch.zeros((B, T - 1, K), dtype=torch.long)
    lps = torch.zeros((B, T - 1, K), dtype=torch.float32)
    tail = torch.full((B, T - 1), LOG_FLOOR, dtype=torch.float32)
    tmask = torch.zeros((B, T - 1), dtype=torch.float32)
    for b, e in enumerate(experiences):
        if e.teacher_ids is None:
            continue
        n, p = len(e.response_ids), len(e.prompt_ids)
        if len(e.teacher_ids) != n or e.teacher_logprobs is None or len(e.teacher_logprobs) != n:
            raise ValueError(f"collate: experience {b}: teacher_ids/teacher_logprobs need one row per response token")
        if has_tail and len(e.teacher_tail) != n:
            raise ValueError(f"collate: experience {b}: teacher_tail needs one entry per response token")
        for i, (row_ids, row_lps) in enumerate(zip(e.teacher_ids, e.teacher_logprobs, strict=True)):
            if not row_ids or not e.mask[i]:
                continue
            if len(row_lps) != len(row_ids):
                raise ValueError(f"collate: experience {b}, position {i}: {len(row_ids)} teacher ids but "
                                 f"{len(row_lps)} logprobs")
            t = p - 1 + i
            ids[b, t] = torch.tensor(row_ids, dtype=torch.long)
            lps[b, t] = torch.tensor(row_lps, dtype=torch.float32)
            tmask[b, t] = 1.0
            if has_tail:
                tail[b, t] = e.teacher_tail[i]
    out = {"teacher_ids": ids, "teacher_logprobs": lps, "teacher_mask": tmask * mask}
    if has_tail:
        out["teacher_tail"] = tail
    return out
