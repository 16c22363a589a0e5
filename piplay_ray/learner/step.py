"""One optimizer step of one role on one learner rank, over the global batch.

A step sees the whole global batch on every rank; `batching.plan` splits it into token-budget
micro-batches, the same count per rank. Each micro-batch loss is normalised by the global batch's
token (or sequence) count and multiplied by the world size, which cancels DeepSpeed's gradient
averaging, so the update equals one full-batch step whatever the world size and micro-batching.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from piplay_ray.cluster import heap
from piplay_ray.config import LearnerConfig
from piplay_ray.learner import batching, packing
from piplay_ray.learner.collate import collate
from piplay_ray.learner.losses import compute_loss, sft_loss, step_normalizers
from piplay_ray.learner.role_engine import RoleEngine
from piplay_ray.records import Experience

_ADDITIVE = {"loss", "pg_loss", "tokens"}  # summed over micro-batches; every other metric is a token mean
_MAXED = {"logp_mismatch_max"}  # the max over micro-batches and ranks


def validate(experiences: Sequence[Experience]) -> None:
    for i, e in enumerate(experiences):
        n = len(e.response_ids)
        if not e.prompt_ids or not n:
            raise ValueError(f"experience {i}: needs a non-empty prompt and response")
        if len(e.mask) != n or len(e.logprobs) != n:
            raise ValueError(f"experience {i}: response_ids ({n}), mask ({len(e.mask)}) and logprobs "
                             f"({len(e.logprobs)}) must have the same length")
        for key in ("teacher_ids", "teacher_logprobs", "teacher_tail"):
            value = getattr(e, key)
            if value is not None and len(value) != n:
                raise ValueError(f"experience {i}: {key} has {len(value)} positions, the response {n}")


def train_step(pol: RoleEngine, experiences: list[Experience], lam: float, objective: str, lc: LearnerConfig,
               rank: int, world_size: int, device: torch.device) -> dict[str, float]:
    """One optimizer step of `pol` (made resident by the caller) on this rank's micro-batches of
    `experiences`; `objective` "rl" (the π-Play loss, distillation weight `lam`) or "sft" (the warm start's
    NLL). Returns the step's metrics, reduced over all ranks."""
    role = pol.role
    if not experiences:
        raise ValueError(f"train_step({role!r}): empty batch")
    wrong = {e.role for e in experiences} - {role}
    if wrong:
        raise ValueError(f"train_step({role!r}): got experiences of role(s) {sorted(wrong)}")
    validate(experiences)  # on every rank before any collective: a bad record fails all ranks, never hangs one
    normalizer, distill_norm = step_normalizers(experiences, lc.loss)
    if objective == "sft":  # a token mean over the demonstrations' own turns
        normalizer = float(sum(sum(e.mask) for e in experiences))
    if normalizer == 0:
        raise ValueError(f"train_step({role!r}): no experience has a trained (mask==1) token")
    packed = lc.pack_sequences  # packing replaces the shared-prefix forward: one or the other per step
    seqs = [e.prompt_ids + e.response_ids for e in experiences]
    shared = batching.common_prefix(seqs) if pol.forward.share_prefix and not packed else None
    plan = batching.plan([e.num_tokens for e in experiences], lc.micro_batch_tokens, world_size, shared, packed)
    mine = plan[rank]
    engine = pol.engine
    engine.train()
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    for j, mb in enumerate(mine):
        real = bool(mb)
        batch = collate([experiences[i] for i in (mb or [0])], pol.pad_id)  # filler: zero-weight copy
        if packed:
            batch = packing.pack(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        prefix = batching.prefix(mb, shared)
        if objective == "rl" and pol.reference is not None:
            batch["ref_logprobs"] = pol.reference.logprobs(batch, lc.loss.chunk_tokens, prefix)
        hidden = pol.forward(engine, batch, prefix)
        if objective == "sft":
            loss, metrics = sft_loss(hidden, batch, normalizer, pol.forward.head, lc.loss.chunk_tokens)
        else:
            loss, metrics = compute_loss(hidden, batch, lc.loss, lam, normalizer=normalizer, head=pol.forward.head,
                                         distill_norm_total=distill_norm)
        engine.set_gradient_accumulation_boundary(j == len(mine) - 1)
        engine.backward(loss * (world_size if real else 0.0), scale_wrt_gas=False)
        if real:
            for k, v in metrics.items():
                if k in _MAXED:
                    sums[k] = max(sums.get(k, v), v)
                    continue
                w = 1.0 if k in _ADDITIVE else metrics.get("tokens", 0.0)
                sums[k] = sums.get(k, 0.0) + v * w
    lr = float(pol.scheduler.get_last_lr()[0])  # the rate this step uses (warm-up moves it after the step)
    engine.step()
    skipped = not engine.was_step_applied()  # non-finite gradients: DeepSpeed leaves the weights as they were
    step_s = time.perf_counter() - t0
    pol.version += 1
    pol.trained.extend(dict.fromkeys(e.group_id for e in experiences))
    grad_norm = engine.get_global_grad_norm()
    local = {"sums": sums, "tokens_seen": sum(experiences[i].num_tokens for mb in mine for i in mb)}
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    total: dict[str, float] = {}
    for g in gathered:
        for k, v in g["sums"].items():
            total[k] = max(total.get(k, v), v) if k in _MAXED else total.get(k, 0.0) + v
    trained = total.get("tokens", 0.0)
    out = {k: (v if k in _ADDITIVE | _MAXED else v / max(trained, 1.0)) for k, v in total.items()}
    seen = sum(g["tokens_seen"] for g in gathered)
    out.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
               lr=lr, step_time_s=step_s, tokens_per_s=seen / step_s,
               total_tokens=float(seen), micro_batches=float(len(mine) * world_size),
               sequences=float(len(experiences)), version=float(pol.version), skipped_step=float(skipped))
    heap.release()  # the activations, while rollouts and the teacher work
    return out
