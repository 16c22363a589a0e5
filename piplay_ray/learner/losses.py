"""The learner's objective, as pure torch: clipped surrogate, KL terms, distillation (batches: collate.py).

Alignment convention: a batch holds right-padded sequences ``input_ids`` [B, T] (prompt then response);
every per-token tensor is *target-aligned* [B, T-1]: index ``t`` describes the token ``input_ids[:, t+1]``,
predicted by the logits at position ``t``. ``mask`` is 1 only where that target is a model-generated response
token, so prompts, inserted ``<information>`` blocks and padding never carry loss or gradient. A packed batch
(packing.py) is one such row holding several sequences, with ``seq_index`` naming each slot's sequence.

Student objective (to minimise), with per-token weights ``w`` from the aggregation mode::

    L = sum_t w_t * [ -c_t min(r_t A, clip(r_t, 1-eps, 1+eps) A) + beta * k3(ref || pi)_t ] + lam * sum_t d_t D_t

where ``D_t`` is the reverse KL from the student to the teacher on the teacher's top-K support (optionally
with a tail bucket holding the remaining mass), ``d_t`` = 1/|y| of its sequence over the number of sequences
(the paper's per-sequence normalisation; or ``w_t``), and ``c_t`` = min(pi_learner/pi_engine, cap) the
truncated importance weight for the rollout engine's numerics (``r_t`` is then against the learner's own
pre-update logprobs; with the correction off, ``c_t`` = 1 and ``r_t`` is against the engine's). The
teacher's numbers are constants (no gradient). Logits are made a chunk of tokens at a time
(``learner/token_stats.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from piplay_ray.config import LossConfig
from piplay_ray.learner.token_stats import token_stats
from piplay_ray.records import Experience

LOG_FLOOR = math.log(1e-12)  # smallest log-mass a bucket may take; keeps KL terms finite
MAX_LOG_RATIO = 20.0  # |log pi/pi_old| beyond this is clamped (only ever reached by broken data)


# ------------------------------------------------------------------------------------------------ pieces


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends. Each branch sees only the inputs it is chosen for (a
    safe -1 elsewhere): `where` passes zero gradient to the other branch, but zero times its infinite
    derivative is NaN — log1p(-exp(x)) for x within fp32 rounding of 0 — and one NaN skips a learner step."""
    near = x > -math.log(2.0)
    safe = torch.full_like(x, -1.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, safe))),
                       torch.log1p(-torch.exp(torch.where(near, safe, x))))


def topk_reverse_kl(student_lp_at_ids: Tensor, teacher_lp: Tensor, teacher_tail: Tensor | None = None) -> Tensor:
    """Per-position KL(student || teacher) on the teacher's top-K support, [..., K] -> [...].

    Without a tail both distributions are renormalised over the K ids. With a tail (``teacher_tail`` =
    log of the teacher's mass outside its top-K) the support is K+1 buckets: the K ids at their actual
    probabilities plus one bucket holding everything else, for student and teacher alike.
    `student_lp_at_ids` are the student's full-vocabulary logprobs gathered at the teacher's ids.
    """
    s, t = student_lp_at_ids, teacher_lp.clamp(min=LOG_FLOOR)
    if teacher_tail is None:
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
        t = t - torch.logsumexp(t, dim=-1, keepdim=True)
        return (s.exp() * (s - t)).sum(-1)
    s_in = torch.logsumexp(s, dim=-1).clamp(max=-1e-12)  # log mass of the student on the K ids
    s_tail = _log1mexp(s_in).clamp(min=LOG_FLOOR)
    t_tail = teacher_tail.clamp(min=LOG_FLOOR)
    return (s.exp() * (s - t)).sum(-1) + s_tail.exp() * (s_tail - t_tail)


def sequence_sums(x: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Sums of `x` [B, T-1] per sequence: [S], and each slot's own sequence's sum, shaped like `x`. A sequence is
    a row of a padded batch, or a run of ``batch["seq_index"]`` in a packed one (`packing.py`)."""
    seq = batch.get("seq_index")
    if seq is None:
        sums = x.sum(dim=1)
        return sums, sums[:, None].expand_as(x)
    sums = x.new_zeros(int(seq.max()) + 1).index_add(0, seq.flatten(), x.flatten())
    return sums, sums[seq]


def _token_weights(mask: Tensor, aggregation: str, normalizer: float | None,
                   batch: dict[str, Tensor] | None = None) -> Tensor:
    if aggregation == "token_mean":
        denom = normalizer if normalizer is not None else mask.sum().clamp(min=1.0)
        return mask / denom
    if aggregation == "seq_mean":
        per_seq, lens = sequence_sums(mask, batch or {})
        denom = normalizer if normalizer is not None else (per_seq > 0).sum().clamp(min=1)
        return mask / lens.clamp(min=1.0) / denom
    raise ValueError(f"unknown aggregation {aggregation!r}; allowed: token_mean, seq_mean")


def distill_normalizer(batch: dict[str, Tensor]) -> float:
    """Sequences with a distillation term: the per-sequence distillation mean's denominator in this batch."""
    if "teacher_mask" not in batch:
        return 0.0
    return float((sequence_sums(batch["teacher_mask"] * batch["mask"], batch)[0] > 0).sum())


def step_normalizers(experiences: Sequence[Experience], loss_cfg: LossConfig) -> tuple[float, float]:
    """The step's loss denominators from the records alone: masked tokens (token_mean) or sequences (seq_mean),
    and sequences with a distillation term. The learner passes them to every micro-batch's `compute_loss`, so
    the micro-batch losses add up to the loss of the whole step's batch."""
    if loss_cfg.aggregation == "token_mean":
        pg = float(sum(sum(1 for m in e.mask if m) for e in experiences))
    else:
        pg = float(sum(1 for e in experiences if any(e.mask)))
    distill = float(sum(1 for e in experiences if e.teacher_ids is not None
                        and any(m and row for m, row in zip(e.mask, e.teacher_ids, strict=False))))
    return pg, distill


def truncated_is_weight(learner_logp: Tensor, engine_logp: Tensor, cap: float) -> Tensor:
    """min(pi_learner / pi_engine, cap) per token: corrects the surrogate for tokens the rollout engine
    sampled with numerics (kernels, precision, staleness) that differ from the learner's ("truncated IS")."""
    return torch.exp((learner_logp - engine_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)).clamp(max=cap)


def _selected_stats(states: Tensor, batch: dict[str, Tensor], head, chunk_tokens: int, with_ids: bool):
    """Token statistics at the trained positions only, scattered back to [B, T-1] (zeros elsewhere)."""
    sel = batch["mask"] > 0
    idx = sel.nonzero(as_tuple=True)
    rows = states[:, :-1][idx]
    ids = batch["teacher_ids"][idx] if with_ids else None
    logp, at_ids, ent = token_stats(rows, batch["input_ids"][:, 1:][idx], ids, head, chunk_tokens)
    shape = tuple(sel.shape)
    logp_full = logp.new_zeros(shape).index_put(idx, logp)
    ent_full = ent.new_zeros(shape).index_put(idx, ent)
    ids_full = None
    if with_ids:
        K = ids.shape[-1]
        ids_full = at_ids.new_full((*shape, K), -math.log(K)).index_put(idx, at_ids)
    return logp_full, ids_full, ent_full


def masked_logprobs(states: Tensor, batch: dict[str, Tensor], head=None, chunk_tokens: int = 1024) -> Tensor:
    """log pi of the sampled tokens at the trained positions [B, T-1], 0 elsewhere; chunked like the loss
    (the learner's reference-model forward)."""
    return _selected_stats(states, batch, head, chunk_tokens, with_ids=False)[0]


def _distill(s_lp: Tensor, batch: dict[str, Tensor], tmask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token top-K reverse KL [B, T-1] and the sanitised teacher logprobs [B, T-1, K]."""
    K = batch["teacher_ids"].shape[-1]
    # padded rows get harmless constants, so no NaN can leak into the gradient through masked positions
    t_lp = torch.where(tmask[..., None] > 0, batch["teacher_logprobs"].float(), -math.log(K))
    t_tail = batch.get("teacher_tail")
    if t_tail is not None:
        t_tail = torch.where(tmask > 0, t_tail.float(), LOG_FLOOR)
    return topk_reverse_kl(s_lp, t_lp, t_tail), t_lp


# ------------------------------------------------------------------------------------------------ the loss


def compute_loss(states: Tensor, batch: dict[str, Tensor], loss_cfg: LossConfig, lam: float = 0.0,
                 normalizer: float | None = None, head=None,
                 distill_norm_total: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """The student/examiner objective over one (micro-)batch from :func:`collate`.

    `states` [B, T, V] are the policy's logits over ``batch["input_ids"]`` (the shift happens here), or with
    `head`, its final hidden states [B, T, H] that `head` (the LM head) maps to logits: then only
    ``loss_cfg.chunk_tokens`` tokens' logits exist at a time, in the forward and the backward. `lam` is the
    distillation coefficient (ignored when the batch has no teacher top-K); ``loss_cfg.kl_beta`` weighs the
    k3 KL to ``batch["ref_logprobs"]`` (required when beta > 0). For micro-batches, `normalizer` and
    `distill_norm_total` are the step's totals (:func:`step_normalizers`). Returns the scalar loss and
    float metrics, each a mean over the generated tokens it concerns (``logp_mismatch_max``: a max).
    """
    input_ids, mask = batch["input_ids"], batch["mask"].float()
    if states.shape[:2] != input_ids.shape:
        raise ValueError(f"compute_loss: states {tuple(states.shape)} do not match input_ids {tuple(input_ids.shape)}")
    beta = loss_cfg.kl_beta
    if beta > 0 and "ref_logprobs" not in batch:
        raise ValueError("compute_loss: learner.loss.kl_beta > 0 needs batch['ref_logprobs']")

    has_teacher = "teacher_ids" in batch
    logp, s_lp, ent = _selected_stats(states, batch, head, loss_cfg.chunk_tokens, with_ids=has_teacher)
    w = _token_weights(mask, loss_cfg.aggregation, normalizer, batch)
    n_tok = mask.sum().clamp(min=1.0)
    on = mask > 0

    def tok_mean(x: Tensor) -> float:
        return float((x.detach() * mask).sum() / n_tok)

    # engine/learner mismatch on the sampled tokens; with the truncated IS correction the learner's own
    # (pre-update) logprobs are pi_old -- one optimizer step per batch, so the ratio is 1 in value -- and
    # the weight min(pi_learner / pi_engine, cap) carries the correction
    engine_lp = batch["old_logprobs"]
    delta = ((logp.detach() - engine_lp) * mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    eps, adv = loss_cfg.clip_eps, batch["advantages"]
    if loss_cfg.is_correction == "truncated":
        is_w = truncated_is_weight(logp.detach(), engine_lp, loss_cfg.is_cap) * mask
        log_ratio = (logp - logp.detach()) * mask
    else:
        is_w = torch.ones_like(mask)
        log_ratio = ((logp - engine_lp) * mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    pg = -is_w * torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    loss = (pg * w).sum()
    clipped = ((ratio > 1 + eps) & (adv > 0)) | ((ratio < 1 - eps) & (adv < 0))
    truncated = (delta > math.log(loss_cfg.is_cap)) & (loss_cfg.is_correction == "truncated")
    metrics = {"pg_loss": float((pg.detach() * w).sum()), "clip_frac": tok_mean(clipped.float()),
               "policy_kl": tok_mean(torch.exp(delta) - 1.0 - delta), "tokens": float(mask.sum()),
               "logp_mismatch_mean": tok_mean(delta.abs()),
               "logp_mismatch_max": float(delta.abs()[on].max()) if on.any() else 0.0,
               "is_weight": tok_mean(is_w), "is_truncated_frac": tok_mean(truncated.float())}

    if "ref_logprobs" in batch:
        kl = k3_kl(logp, batch["ref_logprobs"])
        metrics["ref_kl"] = tok_mean(kl)
        if beta > 0:
            loss = loss + beta * (kl * w).sum()

    if has_teacher:
        tmask = batch["teacher_mask"].float() * mask
        d, t_lp = _distill(s_lp, batch, tmask)
        n_t = tmask.sum().clamp(min=1.0)
        metrics["distill_kl"] = float((d.detach() * tmask).sum() / n_t)
        top1 = batch["teacher_ids"].gather(-1, t_lp.argmax(-1, keepdim=True)).squeeze(-1)
        metrics["teacher_top1_mismatch"] = float(((top1 != input_ids[:, 1:]).float() * tmask).sum() / n_t)
        if lam > 0:
            if loss_cfg.distill_norm == "sequence":  # (1/|y|) sum_t D_t per sequence, mean over sequences
                seqs = distill_norm_total if distill_norm_total is not None else distill_normalizer(batch)
                wd = tmask / sequence_sums(mask, batch)[1].clamp(min=1.0) / max(seqs, 1.0)
            else:
                wd = tmask * w
            loss = loss + lam * (d * wd).sum()

    metrics["entropy"] = tok_mean(ent)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def sft_loss(states: Tensor, batch: dict[str, Tensor], normalizer: float, head=None,
             chunk_tokens: int = 1024) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of the mask-1 tokens (the warm start's demonstrations) divided by `normalizer`
    (the step's trained-token count); logits or hidden states + `head`, chunked like :func:`compute_loss`."""
    mask = batch["mask"].float()
    nll = -(masked_logprobs(states, batch, head, chunk_tokens) * mask).sum()
    n = float(mask.sum())
    return nll / normalizer, {"loss": float(nll.detach()) / normalizer, "sft_nll": float(nll.detach()) / max(n, 1.0),
                              "tokens": n}
