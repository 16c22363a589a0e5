"""Micro-batches by token budget, balanced over data-parallel ranks.

Sequences of very different lengths waste compute when grouped by count, so a micro-batch holds as many
experiences as fit `max_tokens` padded tokens (longest first, so padding stays small). ZeRO reduces
gradients inside every backward, so every rank must run the same number of micro-batches: a rank with
fewer real ones runs a zero-weight filler (an empty list here). Pure Python, so it is tested without
DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence


def pack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices so that len(group) * max(length in group) <= max_tokens (a longer sequence sits alone)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if any(n < 1 for n in lengths):
        raise ValueError("every experience needs at least one token")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        # longest first: the group's first member is its longest, so padded size = count * first length
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def plan(lengths: Sequence[int], max_tokens: int, world_size: int) -> list[list[list[int]]]:
    """Per rank, its micro-batches (lists of indices into `lengths`); all ranks get the same count.

    Micro-batches go to the least-loaded rank that still has room (longest-processing-time first), so
    token work is balanced; `[]` marks a filler micro-batch.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not lengths:
        raise ValueError("cannot plan an empty batch")
    groups = pack(lengths, max_tokens)
    per_rank = -(-len(groups) // world_size)
    cost = [len(g) * lengths[g[0]] for g in groups]
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for g in sorted(range(len(groups)), key=lambda j: -cost[j]):
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
        ranks[r].append(groups[g])
        load[r] += cost[g]
    for mbs in ranks:
        mbs.extend([] for _ in range(per_rank - len(mbs)))
    return ranks

