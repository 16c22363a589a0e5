"""Per-token statistics of the policy's distribution, chunked over tokens so the vocabulary never costs more
than one chunk.

A full [tokens x vocab] fp32 logits tensor is ~10 GB per copy at a cluster micro-batch on a 152k vocabulary,
and a loss makes several (log-softmax, softmax, gradients). Every loss term only needs a few numbers per
token: the log-prob of the sampled token, the log-probs at the teacher's top-K ids and the entropy. So the
logits of a chunk of tokens are made (optionally from hidden states through the LM head), reduced to those
numbers and dropped; with autograd on, each chunk is recomputed in the backward (activation checkpointing),
so the backward too holds one chunk at a time. Chunks are exact: each token's numbers depend on its own row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Head = Callable[[Tensor], Tensor]


def _chunk_stats(rows: Tensor, targets: Tensor, ids: Tensor | None, head: Head | None):
    logits = (head(rows) if head is not None else rows).float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    at_ids = logits.gather(-1, ids) - lse[:, None] if ids is not None else None
    with torch.no_grad():
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, at_ids, ent


def token_stats(rows: Tensor, targets: Tensor, ids: Tensor | None = None, head: Head | None = None,
                chunk_tokens: int = 1024) -> tuple[Tensor, Tensor | None, Tensor]:
    """For N token rows: log pi(targets) [N], log pi at `ids` [N, K] (or None) and the entropy [N] (no grad).

    `rows` [N, V] are logits, or with `head`, hidden states [N, H] that `head` maps to logits. Rows are taken
    `chunk_tokens` at a time; with autograd on and more than one chunk, each chunk is recomputed in the
    backward instead of keeping its logits. ``chunk_tokens <= 0`` takes all rows at once (the unchunked
    computation, kept for comparison).
    """
    n = rows.shape[0]  # may be 0: the outputs are then empty but still part of the graph
    size = n if chunk_tokens <= 0 else chunk_tokens
    if size >= n or n == 0:
        return _chunk_stats(rows, targets, ids, head)
    recompute = torch.is_grad_enabled()
    parts = []
    # split (not slicing) so the backward joins the chunks' row gradients once instead of per chunk
    id_chunks = ids.split(size) if ids is not None else [None] * -(-n // size)
    for r, t, i in zip(rows.split(size), targets.split(size), id_chunks, strict=True):
        parts.append(checkpoint(_chunk_stats, r, t, i, head, use_reentrant=False) if recompute
                     else _chunk_stats(r, t, i, head))
    logp = torch.cat([p[0] for p in parts])
    at_ids = torch.cat([p[1] for p in parts]) if ids is not None else None
    return logp, at_ids, torch.cat([p[2] for p in parts])
