"""Token-budget micro-batching: pure planning, no DeepSpeed."""

import pytest

from piplay_ray.learner import batching


def test_pack_respects_budget_and_covers_everything():
    lengths = [10, 50, 20, 20, 5, 40, 30]
    groups = batching.pack(lengths, max_tokens=60)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 60
    # longest first: 50 alone (50+40 would pad to 100), 40 alone, then 30+20 (2*30=60), 20+10+5 (3*20=60)
    assert groups == [[1], [5], [6, 2], [3, 0, 4]]


def test_oversized_sequence_gets_its_own_micro_batch():
    assert batching.pack([500, 3, 3], max_tokens=100) == [[0], [1, 2]]


def test_plan_gives_every_rank_the_same_count_with_fillers():
    lengths = [100, 90, 80, 10, 10]
    plan = batching.plan(lengths, max_tokens=100, world_size=2)
    assert len(plan) == 2 and len(plan[0]) == len(plan[1])
    real = sorted(i for rank in plan for mb in rank for i in mb)
    assert real == list(range(5))
    # 4 micro-batches ([0], [1], [2], [3, 4]) over 2 ranks: balanced by padded tokens, no filler needed
    assert sum(1 for rank in plan for mb in rank if not mb) == 0
    loads = [sum(len(mb) * max((lengths[i] for i in mb), default=0) for mb in rank) for rank in plan]
    assert abs(loads[0] - loads[1]) <= 100


def test_plan_with_fewer_micro_batches_than_ranks_pads_with_fillers():
    plan = batching.plan([7, 7], max_tokens=100, world_size=3)
    assert plan == [[[0, 1]], [[]], [[]]]


def test_rows_with_a_common_prefix_pack_tighter():
    """Three 60-token sequences opening with the same 40 tokens: 40 + 3 * 20 = 100 fits a budget of 100,
    where three padded rows would cost 180; a fourth without the prefix goes alone."""
    head = list(range(100, 140))
    seqs = [head + [i] * 20 for i in range(3)] + [[7] * 60]
    shared = batching.common_prefix(seqs)
    assert shared(0, 1) == 40 and shared(0, 3) == 0
    assert shared(0, 0) == 59  # a sequence with itself: all but its last token
    lengths = [len(s) for s in seqs]
    assert batching.pack(lengths, 100, shared) == [[0, 1, 2], [3]]
    assert batching.pack(lengths, 100) == [[0], [1], [2], [3]]
    assert batching.cost([0, 1, 2], lengths, shared) == 100 and batching.cost([0, 1, 2], lengths) == 180


def test_a_short_common_prefix_is_not_counted():
    seqs = [[1] * (batching.MIN_SHARED - 1) + [2, 3], [1] * (batching.MIN_SHARED - 1) + [4, 5]]
    assert batching.common_prefix(seqs)(0, 1) == 0


def test_a_micro_batch_prefix_is_what_all_its_rows_share():
    """The forward runs `prefix` once: the shortest common run with the first row, 0 for one row or a
    filler, and identical rows keep their last token each."""
    head = list(range(100, 120))
    seqs = [head + [1, 2, 3], head + [1, 2, 9], head + [5], head[:10] + [6] * 13, head + [1, 2, 3]]
    shared = batching.common_prefix(seqs)
    assert batching.prefix([0, 1], shared) == 22
    assert batching.prefix([0, 1, 2], shared) == 20
    assert batching.prefix([0, 3], shared) == 0  # 10 in common: under MIN_SHARED
    assert batching.prefix([0, 4], shared) == 22  # identical rows: all but the last token
    assert batching.prefix([2], shared) == 0 and batching.prefix([], shared) == 0
    assert batching.prefix([0, 1], None) == 0


@pytest.mark.parametrize("lengths,budget,ws", [([], 10, 1), ([3], 0, 1), ([3], 10, 0), ([0], 10, 1)])
def test_bad_input_is_a_clear_error(lengths, budget, ws):
    with pytest.raises(ValueError):
        batching.plan(lengths, budget, ws)
