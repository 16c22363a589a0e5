"""Losses against independent computations (float64 loops / numpy) on small fixed tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from piplay_ray.config import LossConfig
from piplay_ray.learner import losses
from piplay_ray.learner.collate import collate
from piplay_ray.records import Experience

V = 13


def _exp(prompt, resp, mask, lps, adv=0.0, teacher=None, tail=None, **info):
    ids, tlps = (None, None) if teacher is None else teacher
    return Experience(group_id="g", role="student", prompt_ids=prompt, response_ids=resp, mask=mask,
                      logprobs=lps, reward=0.0, advantage=adv, version=0, teacher_ids=ids,
                      teacher_logprobs=tlps, teacher_tail=tail, info=info)


def _teacher_rows(rng, mask, k, tail: bool):
    """Random teacher top-K rows (sorted, distinct ids) from a random full distribution; empty where mask 0."""
    ids, lps, tails = [], [], []
    for m in mask:
        if not m:
            ids.append([]), lps.append([]), tails.append(0.0)
            continue
        logits = rng.normal(size=V) * 2
        lp = logits - np.log(np.exp(logits).sum())
        order = np.argsort(-lp)[:k]
        ids.append([int(i) for i in order]), lps.append([float(lp[i]) for i in order])
        rest = np.delete(lp, order)
        tails.append(float(np.log(np.exp(rest).sum())) if rest.size else float("-inf"))
    return ids, lps, (tails if tail else None)


def _batch(k=4, tail=True, seed=0):
    rng = np.random.default_rng(seed)
    specs = [([1, 2, 3], [4, 5, 6, 7, 8], [1, 1, 0, 0, 1], 0.7),
             ([2, 3], [9, 10, 11], [1, 1, 1], -1.3),
             ([5, 6, 7, 8], [1, 12], [0, 1], 0.4)]
    exps = []
    for prompt, resp, mask, adv in specs:
        lps = [float(-rng.uniform(0.1, 3.0)) if m else 0.0 for m in mask]
        ids, tlps, tails = _teacher_rows(rng, mask, k, tail)
        exps.append(_exp(prompt, resp, mask, lps, adv, (ids, tlps), tails))
    return exps


def _logits(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T = batch["input_ids"].shape
    return (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 1.5).float().requires_grad_(True)


def _cfg(**kw):
    return LossConfig(**kw)


def _student_lp(logits):
    return torch.log_softmax(logits.detach().double(), dim=-1).numpy()


def test_collate_alignment():
    exps = _batch()
    b = collate(exps, pad_id=0)
    assert b["input_ids"].shape == (3, 8) and b["mask"].shape == (3, 7)
    assert b["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert b["input_ids"][1].tolist() == [2, 3, 9, 10, 11, 0, 0, 0]
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    # target index t predicts input_ids[t+1]; response token i of a prompt of length p sits at t = p-1+i
    assert b["mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 1]
    assert b["mask"][2].tolist() == [0, 0, 0, 0, 1, 0, 0]
    assert b["old_logprobs"][0, 2].item() == pytest.approx(exps[0].logprobs[0])
    assert b["old_logprobs"][0, 6].item() == pytest.approx(exps[0].logprobs[4])
    assert torch.all(b["advantages"][1] == torch.tensor(-1.3))
    assert b["teacher_ids"].shape == (3, 7, 4)
    assert b["teacher_ids"][1, 1].tolist() == exps[1].teacher_ids[0]
    assert b["teacher_tail"][0, 6].item() == pytest.approx(exps[0].teacher_tail[4])
    assert torch.equal(b["teacher_mask"], b["mask"])
    assert "ref_logprobs" not in b


def test_collate_errors_and_optional_parts():
    with pytest.raises(ValueError, match="same length"):
        collate([_exp([1], [2, 3], [1], [0.0, 0.0])], pad_id=0)
    with pytest.raises(ValueError, match="no experiences"):
        collate([], pad_id=0)
    e = _exp([1, 2], [3, 4], [1, 1], [-0.5, -0.2], ref_logprobs=[-0.4, -0.3])
    b = collate([e], pad_id=0)
    assert "teacher_ids" not in b
    assert b["ref_logprobs"][0].tolist() == pytest.approx([0.0, -0.4, -0.3])


def test_masked_logprobs_and_k3():
    b = collate(_batch(), pad_id=0)
    logits = _logits(b)
    lp = losses.masked_logprobs(logits, b).detach().numpy()  # the learner's reference-model forward
    ref = _student_lp(logits)
    ids, mask = b["input_ids"].numpy(), b["mask"].numpy()
    for i in range(3):
        for t in range(7):
            assert lp[i, t] == pytest.approx(ref[i, t, ids[i, t + 1]] if mask[i, t] else 0.0, abs=1e-5)
    x, y = torch.tensor([-1.0, -0.2]), torch.tensor([-0.5, -0.2])
    assert losses.k3_kl(x, y).tolist() == pytest.approx([math.exp(0.5) - 0.5 - 1, 0.0])


@torch.no_grad()
def _distill_per_token(logits, b):
    """The loss's per-token KL(student || teacher) [B, T-1] (its pieces), 0 where there is no teacher row."""
    tmask = b["teacher_mask"].float() * b["mask"].float()
    s_lp = losses._selected_stats(logits, b, None, 0, with_ids=True)[1]
    return losses._distill(s_lp, b, tmask)[0] * tmask


@pytest.mark.parametrize("tail", [False, True])
def test_distill_full_vocab_equals_full_kl(tail):
    exps = _batch(k=V, tail=tail)
    b = collate(exps, pad_id=0)
    logits = _logits(b)
    _, m = losses.compute_loss(logits, b, _cfg(), lam=1.0)
    s = _student_lp(logits)
    kls = []
    for e_i, e in enumerate(exps):
        p = len(e.prompt_ids)
        for i, mk in enumerate(e.mask):
            if not mk:
                continue
            t_full = np.full(V, -np.inf)
            t_full[e.teacher_ids[i]] = e.teacher_logprobs[i]
            s_full = s[e_i, p - 1 + i]
            kls.append(float((np.exp(s_full) * (s_full - t_full)).sum()))
    assert m["distill_kl"] == pytest.approx(np.mean(kls), abs=1e-5)


@pytest.mark.parametrize("tail", [False, True])
def test_distill_topk_independent(tail):
    k = 4
    exps = _batch(k=k, tail=tail, seed=3)
    b = collate(exps, pad_id=0)
    logits = _logits(b, seed=5)
    _, m = losses.compute_loss(logits, b, _cfg(), lam=1.0)
    s = _student_lp(logits)
    kls = []
    for e_i, e in enumerate(exps):
        p = len(e.prompt_ids)
        for i, mk in enumerate(e.mask):
            if not mk:
                continue
            sp = np.exp(s[e_i, p - 1 + i][e.teacher_ids[i]])
            tp = np.exp(np.array(e.teacher_logprobs[i]))
            if tail:
                sp = np.append(sp, 1 - sp.sum())
                tp = np.append(tp, np.exp(e.teacher_tail[i]))
            else:
                sp, tp = sp / sp.sum(), tp / tp.sum()
            kls.append(float((sp * np.log(sp / tp)).sum()))
    assert m["distill_kl"] == pytest.approx(np.mean(kls), abs=1e-5)
    per_tok = _distill_per_token(logits, b)
    assert per_tok[b["teacher_mask"] > 0].tolist() == pytest.approx(kls, abs=1e-5)  # row-major = loop order
    assert torch.all(per_tok[b["teacher_mask"] == 0] == 0)
    top1 = [e.teacher_ids[i][0] != e.response_ids[i] for e in exps for i, mk in enumerate(e.mask) if mk]
    assert m["teacher_top1_mismatch"] == pytest.approx(np.mean(top1))


@pytest.mark.parametrize("top", [-3e-8, -1e-8, -1e-10, -1e-6, -0.5, -3.0])
def test_distill_tail_gradient_is_finite_when_the_student_is_sure(top):
    """A confident student holds all but a sliver of its mass on the teacher's top-K: when 1 - mass is within
    fp32 rounding of 0, the tail bucket's log(1 - mass) had an infinite derivative in the unused branch, the
    gradient became NaN and DeepSpeed skipped the whole learner step. Against float64 autograd of the K + 1
    buckets written out (tail = 1 - the K ids' mass)."""
    s32 = torch.tensor([[top, -25.0]])  # the student's logprobs at the teacher's two ids
    t_lp, t_tail = torch.log(torch.tensor([[0.9, 0.05]])), math.log(0.05)
    s = s32.clone().requires_grad_(True)
    kl = losses.topk_reverse_kl(s, t_lp, torch.tensor([t_tail]))
    kl.sum().backward()
    s64 = s32.double().requires_grad_(True)
    p = s64.exp()
    tail = 1 - p.sum(-1)
    ref = (p * (s64 - t_lp.double())).sum(-1) + tail * (tail.log() - t_tail)
    ref.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert kl.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    assert torch.allclose(s.grad.double(), s64.grad, rtol=1e-2, atol=1e-5)  # fp32 log-mass within 1e-10 of 0


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_masked_positions_get_exactly_zero_gradient(aggregation):
    b = collate(_batch(), pad_id=0)
    b["ref_logprobs"] = torch.randn(b["mask"].shape) * b["mask"]
    logits = _logits(b)
    loss, _ = losses.compute_loss(logits, b, _cfg(aggregation=aggregation, kl_beta=0.1), lam=0.5)
    loss.backward()
    g = logits.grad
    assert torch.isfinite(g).all()
    off = b["mask"] == 0
    assert torch.all(g[:, :-1][off] == 0.0)
    assert torch.all(g[:, -1] == 0.0)
    assert torch.all(g[:, :-1][~off].abs().sum(-1) > 0)


def test_distill_gradient_moves_student_toward_teacher():
    exps = _batch(k=5, tail=True, seed=7)
    for e in exps:
        e.advantage = 0.0
    b = collate(exps, pad_id=0)
    logits = _logits(b, seed=11)
    loss, m0 = losses.compute_loss(logits, b, _cfg(), lam=1.0)
    loss.backward()
    s0 = torch.log_softmax(logits.detach(), -1)
    stepped = (logits.detach() - 0.5 * logits.grad).requires_grad_(True)
    _, m1 = losses.compute_loss(stepped, b, _cfg(), lam=1.0)
    assert m1["distill_kl"] < m0["distill_kl"]
    s1 = torch.log_softmax(stepped.detach(), -1)
    # wherever the teacher gives its top-1 token more mass than the student does, the student's logprob rises
    top = b["teacher_ids"][..., :1]
    before = s0[:, :-1].gather(-1, top).squeeze(-1)
    after = s1[:, :-1].gather(-1, top).squeeze(-1)
    wants_up = (b["teacher_mask"] > 0) & (b["teacher_logprobs"][..., 0] > before)
    assert wants_up.any()
    assert torch.all(after[wants_up] > before[wants_up])


def _surrogate_reference(logp, old, adv, mask, eps, aggregation):
    """Independent PPO clipped surrogate with explicit loops."""
    B, T = len(mask), len(mask[0])
    per_seq, total, n = [], 0.0, 0
    for i in range(B):
        terms = []
        for t in range(T):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            a = adv[i][t]
            terms.append(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a))
        total += sum(terms)
        n += len(terms)
        if terms:
            per_seq.append(sum(terms) / len(terms))
    return total / n if aggregation == "token_mean" else sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_surrogate_matches_independent_including_clipped(aggregation):
    exps = _batch()
    for e in exps:
        e.teacher_ids = e.teacher_logprobs = e.teacher_tail = None
    b = collate(exps, pad_id=0)
    logits = _logits(b)
    logp = losses.masked_logprobs(logits, b).detach()
    # behaviour logprobs chosen so some ratios sit far outside [1-eps, 1+eps] on both sides
    shifts = torch.tensor([[0, 0, 0.5, -0.5, 0, 0, 0.05], [0, 1.0, -1.0, 0.1, 0, 0, 0], [0, 0, 0, 0, -0.3, 0, 0]])
    b["old_logprobs"] = (logp + shifts) * b["mask"]
    eps = 0.2
    # the plain PPO surrogate against the engine's logprobs (no truncated-IS correction)
    cfg = _cfg(clip_eps=eps, aggregation=aggregation, is_correction="none")
    loss, m = losses.compute_loss(logits, b, cfg, lam=0.0)
    want = _surrogate_reference(logp.tolist(), b["old_logprobs"].tolist(), b["advantages"].tolist(),
                                b["mask"].tolist(), eps, aggregation)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    # clip fraction: ratio > 1+eps with A > 0, or ratio < 1-eps with A < 0
    r = torch.exp(logp - b["old_logprobs"])
    a = b["advantages"]
    cl = (((r > 1 + eps) & (a > 0)) | ((r < 1 - eps) & (a < 0))) & (b["mask"] > 0)
    assert m["clip_frac"] == pytest.approx(cl.sum().item() / b["mask"].sum().item())
    assert 0 < m["clip_frac"] < 1
    # clipped tokens carry no gradient
    loss.backward()
    t_idx = cl.nonzero()
    assert len(t_idx) and all(logits.grad[i, t].abs().sum() == 0 for i, t in t_idx.tolist())


def test_kl_beta_adds_k3_term_and_normalizer_splits():
    exps = _batch()
    b = collate(exps, pad_id=0)
    logits = _logits(b)
    b["ref_logprobs"] = (losses.masked_logprobs(logits, b).detach() - 0.3) * b["mask"]
    base, _ = losses.compute_loss(logits, b, _cfg(), lam=0.0)
    with_kl, m = losses.compute_loss(logits, b, _cfg(kl_beta=0.5), lam=0.0)
    k3 = math.exp(-0.3) + 0.3 - 1
    assert (with_kl - base).item() == pytest.approx(0.5 * k3, abs=1e-5)
    assert m["ref_kl"] == pytest.approx(k3, abs=1e-5)
    # micro-batches with the step's normalizer add up to the full-batch loss
    for agg in ("token_mean", "seq_mean"):
        cfg = _cfg(aggregation=agg)
        full, _ = losses.compute_loss(logits, b, cfg, lam=0.3)
        m = b["mask"]  # masked tokens (token_mean) or sequences (seq_mean); sequences with a teacher
        norm = float(m.sum()) if agg == "token_mean" else float((m.sum(dim=1) > 0).sum())
        d_norm = float(((b["teacher_mask"] * m).sum(dim=1) > 0).sum())
        assert (norm, d_norm) == losses.step_normalizers(exps, cfg)
        parts = 0.0
        for sl in (slice(0, 1), slice(1, 3)):
            sub = {k: v[sl] for k, v in b.items()}
            parts += losses.compute_loss(logits[sl], sub, cfg, lam=0.3, normalizer=norm,
                                         distill_norm_total=d_norm)[0].item()
        assert parts == pytest.approx(full.item(), abs=1e-5)


def test_entropy_metric():
    b = collate(_batch(), pad_id=0)
    logits = _logits(b)
    _, m = losses.compute_loss(logits, b, _cfg(), lam=0.0)
    s = _student_lp(logits)[:, :-1]
    ent = -(np.exp(s) * s).sum(-1)
    mask = b["mask"].numpy()
    assert m["entropy"] == pytest.approx(float((ent * mask).sum() / mask.sum()), abs=1e-5)


# ------------------------------------------------------------------------------------------------ chunked loss


def _reference_loss(logits, b, beta, lam, cap):
    """Independent float64 loss, token by token: truncated-IS surrogate, k3 to ref, per-sequence distillation."""
    lg = logits.double()
    mask, ids = b["mask"], b["input_ids"]
    n_tok = mask.sum().item()
    pg = kl = 0.0
    seq_terms = []
    for i in range(mask.shape[0]):
        d_sum, y_len = 0.0, mask[i].sum().item()
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            lp_all = torch.log_softmax(lg[i, t], -1)
            lp = lp_all[ids[i, t + 1]]
            w = min(math.exp(lp.item() - b["old_logprobs"][i, t].item()), cap)
            pg = pg - w * b["advantages"][i, t].item() * torch.exp(lp - lp.detach()) / n_tok
            d = b["ref_logprobs"][i, t].double() - lp
            kl = kl + (torch.exp(d) - d - 1) / n_tok
            sp = torch.exp(lp_all[b["teacher_ids"][i, t]])
            tp = torch.exp(b["teacher_logprobs"][i, t].double())
            s_tail, t_tail = 1 - sp.sum(), math.exp(b["teacher_tail"][i, t].item())
            d_sum = d_sum + (sp * torch.log(sp / tp)).sum() + s_tail * torch.log(s_tail / t_tail)
        seq_terms.append(d_sum / y_len)
    return pg + beta * kl + lam * sum(seq_terms) / len(seq_terms)


def test_chunked_head_loss_equals_unchunked_and_independent_reference():
    """Hidden states through an LM head, 2 tokens per chunk: values and gradients (hidden and head weight)
    equal the unchunked logits path and an independent float64 loop."""
    exps = _batch(k=4, tail=True, seed=4)
    b = collate(exps, pad_id=0)
    b["ref_logprobs"] = (torch.randn(b["mask"].shape, generator=torch.Generator().manual_seed(2)) - 2) * b["mask"]
    g = torch.Generator().manual_seed(9)
    B, T = b["input_ids"].shape
    hidden0 = torch.randn(B, T, 6, generator=g)
    weight0 = torch.randn(V, 6, generator=g)
    beta, lam, cap = 0.2, 0.7, 1.5
    results = []
    for chunk, use_head in ((2, True), (0, True), (0, False)):
        hidden, weight = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
        cfg = _cfg(kl_beta=beta, is_cap=cap, chunk_tokens=chunk)
        if use_head:
            loss, m = losses.compute_loss(hidden, b, cfg, lam=lam, head=lambda h, w=weight: h @ w.T)
        else:
            loss, m = losses.compute_loss(hidden @ weight.T, b, cfg, lam=lam)
        loss.backward()
        results.append((loss.item(), m, hidden.grad, weight.grad))
    hidden, weight = hidden0.double().requires_grad_(True), weight0.double().requires_grad_(True)
    want = _reference_loss(hidden @ weight.T, b, beta, lam, cap)
    want.backward()
    for value, m, gh, gw in results:
        assert value == pytest.approx(want.item(), abs=1e-5)
        torch.testing.assert_close(gh, hidden.grad.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gw, weight.grad.float(), atol=1e-5, rtol=1e-4)
        for k in ("entropy", "distill_kl", "ref_kl", "logp_mismatch_max", "is_weight"):
            assert m[k] == pytest.approx(results[-1][1][k], rel=1e-5, abs=1e-6), k
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def test_token_stats_recomputes_chunks_in_backward():
    """With chunks, only the chunk's inputs are saved: the forward keeps no [tokens x vocab] tensor alive."""
    from piplay_ray.learner.token_stats import token_stats

    rows = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    big = []

    def pack(t):
        if t.numel() >= 1000 * 16:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_stats(rows, torch.randint(0, 1000, (64,)), head=lambda h: h @ weight.T, chunk_tokens=16)
    assert big == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_stats(rows, torch.randint(0, 1000, (64,)), head=lambda h: h @ weight.T, chunk_tokens=0)
    assert big  # the unchunked computation saves full-vocabulary logits
