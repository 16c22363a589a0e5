"""Packed micro-batches (learner/packing.py): the layout, the planner's cost, and the loss and gradients of a
real transformers model against the right-padded path computed separately."""

from __future__ import annotations

import random

import pytest
import torch

from piplay_ray.config import LossConfig
from piplay_ray.learner import batching, losses, packing
from piplay_ray.learner.collate import collate
from piplay_ray.learner.hidden import HiddenForward
from piplay_ray.learner.losses import LOG_FLOOR, compute_loss, masked_logprobs, sequence_sums
from piplay_ray.records import Experience

V, K, PAD = 128, 4, 0
SPECS = [(5, 12, True), (9, 4, False), (3, 20, True), (7, 9, False)]  # prompt, response, with teacher top-K


def _experiences(seed: int = 0) -> list[Experience]:
    rng = random.Random(seed)
    out = []
    for i, (p, r, teacher) in enumerate(SPECS):
        mask = [0 if 2 <= j < 4 else 1 for j in range(r)]  # an inserted <information> span
        rows = [rng.sample(range(1, V), K) if m else [] for m in mask]
        lps = [sorted((-rng.uniform(0.1, 4) for _ in range(K)), reverse=True) if m else [] for m in mask]
        out.append(Experience(
            group_id=f"g{i // 2}", role="student", prompt_ids=[rng.randrange(1, V) for _ in range(p)],
            response_ids=[rng.randrange(1, V) for _ in range(r)], mask=mask,
            logprobs=[-rng.uniform(0.5, 5) * m for m in mask], reward=float(i % 2), advantage=0.9 - 0.6 * i,
            version=0, teacher_ids=rows if teacher else None, teacher_logprobs=lps if teacher else None,
            teacher_tail=[-rng.uniform(0.5, 3) for _ in mask] if teacher else None,
            info={"ref_logprobs": [-rng.uniform(0.5, 5) * m for m in mask]}))
    return out


def test_pack_concatenates_rows_and_masks_each_boundary_slot():
    exps = _experiences()
    padded = collate(exps, PAD)
    packed = packing.pack(padded)
    lengths = [e.num_tokens for e in exps]
    N = sum(lengths)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, N)
    assert packed["input_ids"][0].tolist() == [t for e in exps for t in e.prompt_ids + e.response_ids]
    assert packed["position_ids"][0].tolist() == [t for n in lengths for t in range(n)]
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    boundaries = [s - 1 for s in starts[1:]]  # the slot where one sequence's last token "predicts" the next's first
    for key in ("mask", "old_logprobs", "advantages", "ref_logprobs", "teacher_mask", "teacher_tail", "seq_index"):
        assert packed[key].shape == (1, N - 1), key
    assert packed["teacher_ids"].shape == packed["teacher_logprobs"].shape == (1, N - 1, K)
    for t in boundaries:
        assert packed["mask"][0, t] == 0 and packed["teacher_mask"][0, t] == 0
        assert packed["advantages"][0, t] == 0 and packed["old_logprobs"][0, t] == 0
        assert packed["ref_logprobs"][0, t] == 0 and packed["teacher_tail"][0, t] == LOG_FLOOR
        assert (packed["teacher_ids"][0, t] == 0).all() and (packed["teacher_logprobs"][0, t] == 0).all()
    for b, (s, n) in enumerate(zip(starts, lengths, strict=True)):  # a sequence's own slots: its padded row's
        for key in ("mask", "old_logprobs", "advantages", "ref_logprobs", "teacher_ids", "teacher_tail"):
            assert torch.equal(packed[key][0, s : s + n - 1], padded[key][b, : n - 1]), key
        assert (packed["seq_index"][0, s : s + n - 1] == b).all()
    assert packed["mask"].sum() == padded["mask"].sum() == sum(sum(e.mask) for e in exps)
    # per-sequence sums (seq_mean, distillation's 1/|y|) are the padded rows' sums
    assert torch.equal(sequence_sums(packed["mask"], packed)[0], padded["mask"].sum(1))


def test_packed_cost_is_the_sum_of_lengths_and_fills_first_fit():
    lengths = [10, 50, 20, 20, 5, 40, 30]
    groups = batching.pack(lengths, 60, packed=True)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    # longest first into the first micro-batch with room: 50+10, 40+20, 30+20+5
    assert groups == [[1, 0], [5, 2], [6, 3, 4]]
    assert [batching.cost(g, lengths, packed=True) for g in groups] == [60, 60, 55]
    assert batching.cost([1, 0], lengths) == 100  # padded: 2 x 50
    assert batching.pack([500, 3, 3], 100, packed=True) == [[0], [1, 2]]  # a longer sequence sits alone
    plan = batching.plan(lengths, 60, 2, packed=True)
    assert len(plan[0]) == len(plan[1]) == 2 and [] in plan[0] + plan[1]  # 3 micro-batches, one filler
    with pytest.raises(ValueError, match="one or the other"):
        batching.pack(lengths, 60, batching.common_prefix([[1] * n for n in lengths]), packed=True)


def _model(arch: str, attn: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=V,
                               max_position_embeddings=256, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).train()


def _loss_and_grads(model, ref, batch, cfg: LossConfig, norms):
    """What train_step runs on one micro-batch: reference logprobs and hidden states through `HiddenForward`,
    the chunked loss, its backward."""
    model.zero_grad(set_to_none=True)
    batch = dict(batch)
    with torch.no_grad():
        fwd = HiddenForward(ref)
        batch["ref_logprobs"] = masked_logprobs(fwd(ref, batch), batch, fwd.head, cfg.chunk_tokens).float()
    fwd = HiddenForward(model, share_prefix=False)
    loss, metrics = compute_loss(fwd(model, batch), batch, cfg, lam=0.5, normalizer=norms[0], head=fwd.head,
                                 distill_norm_total=norms[1])
    loss.backward()
    return loss.detach(), metrics, batch["ref_logprobs"], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch,attn,aggregation,step_norms,checkpointing", [
    ("llama", "sdpa", "token_mean", True, False), ("llama", "eager", "seq_mean", False, False),
    ("qwen3", "sdpa", "seq_mean", True, False), ("qwen3", "eager", "token_mean", False, False),
    ("llama", "sdpa", "seq_mean", True, True)])
def test_packed_loss_and_gradients_equal_the_padded_ones(arch, attn, aggregation, step_norms, checkpointing):
    """Four sequences of different lengths (two with teacher top-K and tail), k3 KL to a reference that runs
    on the same batch layout, chunked logits: the packed micro-batch gives the padded loss, metrics and every
    parameter's gradient (with activation checkpointing too: it runs only the packed side)."""
    model, ref = _model(arch, attn, 0), _model(arch, attn, 1).eval()
    exps = _experiences(seed=3)
    cfg = LossConfig(aggregation=aggregation, kl_beta=0.05, chunk_tokens=7)
    norms = losses.step_normalizers(exps, cfg) if step_norms else (None, None)
    padded = collate(exps, PAD)
    del padded["ref_logprobs"]  # made by the reference model below, on each layout
    loss_pad, m_pad, ref_pad, g_pad = _loss_and_grads(model, ref, padded, cfg, norms)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = packing.pack(padded)
    loss_pack, m_pack, ref_pack, g_pack = _loss_and_grads(model, ref, packed, cfg, norms)

    sel = packed["mask"][0] > 0
    torch.testing.assert_close(ref_pack[0][sel], ref_pad[padded["mask"] > 0], rtol=1e-5, atol=1e-6)
    assert loss_pad.abs() > 1e-3 and m_pad["distill_kl"] > 0 and m_pad["ref_kl"] > 0  # every term is there
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=1e-6)
    assert m_pack.keys() == m_pad.keys()
    for k, v in m_pad.items():
        assert m_pack[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for name, g in g_pad.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g_pack[name], g, rtol=1e-5, atol=1e-6 * max(1.0, g.abs().max().item()),
                                   msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_comparison_would_see_attention_across_sequences(attn):
    """The control for the test above: the same packed row with a 2-D all-ones mask (transformers then skips
    its packed-sequence detection) lets later sequences attend to earlier ones, and their hidden states move
    far beyond the tolerance; with position_ids alone they equal the padded rows'."""
    model = _model("llama", attn, 0).eval()
    exps = _experiences()
    padded, lengths = collate(exps, PAD), [e.num_tokens for e in exps]
    packed = packing.pack(padded)
    with torch.no_grad():
        want = model.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).last_hidden_state
        want = torch.cat([want[b, :n] for b, n in enumerate(lengths)])
        kw = dict(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
        good = model.model(**kw).last_hidden_state[0]
        leaky = model.model(**kw, attention_mask=torch.ones_like(packed["input_ids"])).last_hidden_state[0]
    torch.testing.assert_close(good, want, rtol=1e-5, atol=1e-5)
    first = lengths[0]
    torch.testing.assert_close(leaky[:first], want[:first], rtol=1e-5, atol=1e-5)  # the first sees nothing before
    assert (leaky[first:] - want[first:]).abs().max() > 1e-2


def test_packing_refuses_an_attention_it_cannot_keep_apart():
    from types import SimpleNamespace

    packing.check_attention(SimpleNamespace(_attn_implementation="sdpa"))
    with pytest.raises(ValueError, match="pack_sequences"):
        packing.check_attention(SimpleNamespace(_attn_implementation="paged|sdpa"))


def test_flex_attention_keeps_packed_sequences_apart():
    """Flex attention gets its BlockMask from the same position_ids (one forward: its CPU kernel compiles, ~30 s)."""
    model = _model("llama", "flex_attention", 0).eval()
    exps = _experiences()
    padded, lengths = collate(exps, PAD), [e.num_tokens for e in exps]
    packed = packing.pack(padded)
    with torch.no_grad():
        want = model.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).last_hidden_state
        got = model.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                          use_cache=False).last_hidden_state[0]
    torch.testing.assert_close(got, torch.cat([want[b, :n] for b, n in enumerate(lengths)]), rtol=1e-5, atol=1e-5)
