"""Micro-batches by token budget, balanced over data-parallel ranks.

Sequences of very different lengths waste compute when grouped by count, so a micro-batch holds as many
experiences as fit `max_tokens` tokens through the model (longest first, so padding stays small). The
rows' common prefix runs once (`hidden.py`), so a micro-batch of n rows padded to L that share s leading
tokens costs s + n * (L - s). ZeRO reduces gradients inside every backward, so every rank must run the
same number of micro-batches: a rank with fewer real ones runs a zero-weight filler (an empty list here).
Packed (`packing.py`, instead of prefix sharing) a micro-batch costs the sum of its lengths, and each
sequence goes to the first micro-batch it fits (first-fit decreasing): no padding to keep small.
Pure Python, so it is tested without DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Shared = Callable[[int, int], int]  # shared(i, j): leading tokens sequences i and j have in common
MIN_SHARED = 16  # a shorter common prefix is not worth a second forward call: counted (and run) as 0


def common_prefix(seqs: Sequence[Sequence[int]]) -> Shared:
    """`shared` for token sequences: their common prefix, leaving each at least one token of its own."""

    def shared(i: int, j: int) -> int:
        a, b = seqs[i], seqs[j]
        n = min(len(a), len(b)) - 1
        k = 0
        while k < n and a[k] == b[k]:
            k += 1
        return k if k >= MIN_SHARED else 0

    return shared


def pack(lengths: Sequence[int], max_tokens: int, shared: Shared | None = None,
         packed: bool = False) -> list[list[int]]:
    """Group indices so that each group's cost (`cost`) is <= max_tokens (a longer sequence sits alone)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if any(n < 1 for n in lengths):
        raise ValueError("every experience needs at least one token")
    if packed and shared:
        raise ValueError("a packed micro-batch shares no prefix: pass one or the other")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    if packed:
        room: list[int] = []
        for i in order:
            g = next((g for g, r in enumerate(room) if lengths[i] <= r), len(groups))
            if g == len(groups):  # fits no open micro-batch (or is longer than the budget): a new one
                groups.append([])
                room.append(max_tokens)
            groups[g].append(i)
            room[g] -= lengths[i]
        return groups
    prefix: list[int] = []  # each group's common prefix
    for i in order:
        # longest first: the group's first member is its longest, so it sets the padded length
        if groups:
            g = groups[-1]
            s = min(prefix[-1], shared(g[0], i)) if shared else 0
            if s + (len(g) + 1) * (lengths[g[0]] - s) <= max_tokens:
                g.append(i)
                prefix[-1] = s
                continue
        groups.append([i])
        prefix.append(lengths[i] - 1)
    return groups


def prefix(group: Sequence[int], shared: Shared | None) -> int:
    """The leading tokens every row of a micro-batch has in common: what the forward runs once (0 for one row)."""
    return min((shared(group[0], i) for i in group[1:]), default=0) if shared else 0


def cost(group: Sequence[int], lengths: Sequence[int], shared: Shared | None = None, packed: bool = False) -> int:
    """Tokens through the model for one micro-batch: packed, the sum of its lengths; else the common prefix once
    and every row's rest padded."""
    if packed:
        return sum(lengths[i] for i in group)
    s = prefix(group, shared)
    return s + len(group) * (max(lengths[i] for i in group) - s)


def plan(lengths: Sequence[int], max_tokens: int, world_size: int, shared: Shared | None = None,
         packed: bool = False) -> list[list[list[int]]]:
    """Per rank, its micro-batches (lists of indices into `lengths`); all ranks get the same count.

    Micro-batches go to the least-loaded rank that still has room (longest-processing-time first), so
    token work is balanced; `[]` marks a filler micro-batch.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not lengths:
        raise ValueError("cannot plan an empty batch")
    groups = pack(lengths, max_tokens, shared, packed)
    per_rank = -(-len(groups) // world_size)
    costs = [cost(g, lengths, shared, packed) for g in groups]
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for g in sorted(range(len(groups)), key=lambda j: -costs[j]):
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
        ranks[r].append(groups[g])
        load[r] += costs[g]
    for mbs in ranks:
        mbs.extend([] for _ in range(per_rank - len(mbs)))
    return ranks
