"""GPU memory per GPU actor of a config, so a layout is sized before a run, not by an out-of-memory error.

Pure arithmetic over the config and the model shapes (`shapes.py`; no torch, no Ray); GB = 1e9 B.
- Learner rank: per trained role bf16 weights + grads and fp32 master + 2 Adam moments (16 B/param), split
  over `learner.world_size` by ZeRO stage (3: all, 2: grads + states, 1: states). With `offload_inactive`
  (stage >= 1) the idle role's gradients and optimizer states wait in host memory; its bf16 weight partitions
  stay, so a publish gathers them without a reload (learner/offload.py). LoRA: frozen bf16 base of both
  roles, adapter with full states. ZeRO-3 keeps up to stage3_max_live_parameters gathered (DeepSpeed's
  default 1e9: role_engine.ds_config leaves it) + its 5e7-element buckets. Activations at `micro_batch_tokens` (checkpointing: block inputs + one recomputed
  block and its gradients; else every block) and the loss's float32 logits of `loss.chunk_tokens` (x3).
- vLLM engine, per GPU of its TP group: `gpu_memory_utilization` x card holds weights, profiled activations,
  CUDA graphs, non-torch memory, and the KV cache takes the rest. On top: the weight-sync receive buffer
  (made after vLLM's profile) and, where prompt logprobs are scored (the teacher; the student's engines with
  `teacher.backend: shared`), bf16 logits + float32 log-softmax of one request, [max_model_len x vocab]
  (vLLM may chunk it by its default max_num_batched_tokens, unset here: an upper bound).
- Weight sync (collective.py, base.BucketRing): the sender rings 2 buckets of `weight_sync.bucket_mb`, a
  tensor larger than a bucket travels as itself; a receiver holds one bucket or that tensor.
`python -m piplay_ray.cluster.gpu_memory CONFIG [--card-gb 80] [--min-headroom 0.1] [key=value ...]`
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from piplay_ray.cluster.shapes import Arch, arch
from piplay_ray.config import Config, load_config
from piplay_ray.roles import TRAINED

GB = 1e9
LEARNER_OVERHEAD = 5e9  # CUDA context, NCCL buffers of ZeRO and the sync group, allocator fragmentation
VLLM_NON_TORCH = 1.5e9  # CUDA context, cuBLAS and TP NCCL workspaces: inside vLLM's profile (less KV)
VLLM_GRAPHS = 1e9  # CUDA graphs when enforce_eager is off: inside the share
VLLM_OUTSIDE = 1e9  # the sync group's NCCL communicator and allocator slack, created after vLLM's profile
DS_LIVE_PARAMS, DS_BUCKET = 1e9, 5e7  # DeepSpeed defaults / role_engine.ds_config (elements)


@dataclass
class ActorMemory:
    """One GPU actor (layout.py's slot name), per GPU; `parts` in bytes, `card` the bytes it may use."""

    name: str
    card: float
    parts: dict[str, float] = field(default_factory=dict)
    kv_tokens: int | None = None  # tokens the KV cache holds (vLLM)
    need_tokens: int | None = None  # rollout.max_model_len

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def headroom(self) -> float:
        return 1 - self.total / self.card

    def problems(self, min_headroom: float = 0.0) -> list[str]:
        out = [f"{self.name}: {self.total / GB:.1f} GB of {self.card / GB:.0f} GB leaves {self.headroom:.1%} "
               f"headroom (< {min_headroom:.0%})"] if self.headroom < min_headroom else []
        if self.kv_tokens is not None and self.kv_tokens < self.need_tokens:
            out.append(f"{self.name}: its KV cache holds {self.kv_tokens} tokens, less than "
                       f"rollout.max_model_len={self.need_tokens}")
        return out

    def to_dict(self) -> dict:
        gb = {**self.parts, "total": self.total, "card": self.card}
        return {"name": self.name, **{k: round(v / GB, 2) for k, v in gb.items()},
                "headroom": round(self.headroom, 3), "kv_tokens": self.kv_tokens}


def _sync(cfg: Config, a: Arch, sender: bool) -> float:
    """Bytes of weight-sync buffers on a GPU: only the pushing transports move GPU tensors; `ipc` receivers
    map the sender's buckets instead of holding their own (a `collective` that runs as ipc on one GPU is
    counted as collective: a bucket too many per receiver)."""
    kind = cfg.weight_sync.transport
    if kind not in ("collective", "ipc") or (kind == "ipc" and not sender):
        return 0.0
    lc, bucket = cfg.learner.lora, cfg.weight_sync.bucket_mb * 2**20
    payload = 2 * (a.lora_params(lc.rank, lc.target_modules) if lc.rank else a.params)
    largest = 2 * (lc.rank * max(a.hidden, a.inter) if lc.rank else a.vocab * a.hidden)
    if sender:
        return min(payload, 2 * bucket) + (largest if largest > bucket else 0)
    return min(payload, max(bucket, largest))


def _learner(cfg: Config, rank: int, card: float) -> ActorMemory:
    lc, a, z = cfg.learner, arch(cfg.model.path_for("student")), cfg.learner.zero_stage
    w, opt = (2, 12) if lc.bf16 in (True, "auto") else (4, 8)
    div = lambda stage: lc.world_size if z >= stage else 1  # noqa: E731
    resident = 1 if lc.offload_inactive and z >= 1 else len(TRAINED)  # roles whose trained states are here
    resident_w = len(TRAINED)  # offloading keeps every role's weight partitions on the device
    trained = a.lora_params(lc.lora.rank, lc.lora.target_modules) if lc.lora.rank else a.params
    frozen = a.params * len(TRAINED) * w / div(3) if lc.lora.rank else 0.0
    T, chunk = lc.micro_batch_tokens, min(lc.loss.chunk_tokens or lc.micro_batch_tokens, lc.micro_batch_tokens)
    values = a.block_values(lc.lora.target_modules if lc.lora.rank else None)
    kept = a.layers * T * a.hidden + 2 * T * values if lc.gradient_checkpointing else a.layers * T * values
    parts = {"weights": frozen + resident_w * trained * w / div(3)
                        + (len(TRAINED) * a.params * w if lc.loss.kl_beta > 0 else 0),  # KL reference, whole
             "grads": resident * trained * w / div(2),
             "optimizer": resident * trained * opt / div(1),
             "gathered": (min(DS_LIVE_PARAMS, a.params) * w if z == 3 else 0) + 2 * DS_BUCKET * w,
             "activations": (kept + 2 * T * a.hidden) * 2,  # bf16; + the final hidden states and their grad
             "logits": chunk * a.vocab * 4 * 3,
             "weight_sync": _sync(cfg, a, sender=True) if rank == 0 else 0.0,
             "overhead": LEARNER_OVERHEAD}
    return ActorMemory(f"learner-{rank}", card, parts)


def _engine(cfg: Config, name: str, model: str, engine: str, tp: int, util: float, card: float, card_gb: float,
            scores: bool, lora: bool) -> ActorMemory:
    r, a, lc, L = cfg.rollout, arch(model), cfg.learner.lora, cfg.rollout.max_model_len
    weights = 2 * a.params / tp + (2 * 2 * a.lora_params(lc.rank, lc.target_modules) / tp if lora else 0)  # 2 slots
    logits = {"logits": L * a.vocab * 6} if scores or engine != "vllm" else {}  # bf16 + float32 log-softmax
    rest = {"weight_sync": _sync(cfg, a, sender=False), "overhead": VLLM_NON_TORCH + VLLM_OUTSIDE}
    if engine != "vllm":  # transformers: one request at a time, its own cache and every position's logits
        return ActorMemory(name, card, {"weights": weights, "kv_cache": L * a.kv_bytes_per_token / tp, **logits,
                                        **rest})
    # vLLM's profile: one forward of max_model_len tokens (MLP and residual intermediates), the sampler's
    # float32 logits and probabilities of max_num_seqs rows, and CUDA graphs
    acts = (L * (3 * a.inter / tp + 4 * a.hidden) * 2 + r.max_num_seqs * a.vocab * 8
            + VLLM_GRAPHS * (not r.enforce_eager))
    kv = max(0.0, util * card_gb * GB - weights - acts - VLLM_NON_TORCH)
    parts = {"weights": weights, "activations": acts, "kv_cache": kv, **logits, **rest}
    return ActorMemory(name, card, parts, int(kv // (a.kv_bytes_per_token / tp)), L)


def actors(cfg: Config, card_gb: float = 80.0) -> list[ActorMemory]:
    """Every GPU actor of `cfg` (learner ranks, rollout engines per role, the teacher when it has its own)."""
    r, lc, t = cfg.rollout, cfg.learner, cfg.teacher
    card = lambda gpus: card_gb * GB * min(gpus, 1.0)  # noqa: E731  per GPU; a fraction shares its card
    lora, shared = lc.lora.rank > 0, t.backend == "shared"
    out = [_learner(cfg, i, card(lc.num_gpus_per_rank)) for i in range(lc.world_size if lc.num_gpus_per_rank else 0)]
    if r.num_gpus_per_worker:
        out += [_engine(cfg, f"rollout-{role}-{i}", cfg.model.path_for(role), r.engine, r.tensor_parallel_size,
                        r.gpu_memory_utilization, card(r.num_gpus_per_worker), card_gb,
                        scores=shared and role == "student", lora=lora)
                for role in TRAINED for i in range(r.workers_per_role)]
    if t.num_gpus and not shared:
        teacher = _engine(cfg, "teacher", cfg.model.path_for("teacher"), t.backend, t.tensor_parallel_size,
                          t.gpu_memory_utilization, card(t.num_gpus / t.tensor_parallel_size), card_gb,
                          scores=True, lora=lora)
        if not (t.backend == "vllm" and t.ema_on_host):  # float32 masters beside the engine (on its first GPU)
            a = arch(cfg.model.path_for("teacher"))
            teacher.parts["ema"] = 4 * (a.lora_params(lc.lora.rank, lc.lora.target_modules) if lora else a.params)
        out.append(teacher)
    return out


def problems(cfg: Config, card_gb: float = 80.0, min_headroom: float = 0.0) -> list[str]:
    """Why `cfg` does not fit cards of `card_gb` with `min_headroom` spare (empty: it fits)."""
    return [p for m in actors(cfg, card_gb) for p in m.problems(min_headroom)]


def report(cfg: Config, card_gb: float = 80.0) -> list[dict]:
    """The actors as JSON-able rows, figures in GB."""
    return [m.to_dict() for m in actors(cfg, card_gb)]


COLUMNS = {"weights": "weights", "grads": "grads", "optimizer": "optim", "gathered": "gathered",
           "activations": "activ", "logits": "logits", "ema": "ema", "weight_sync": "sync", "kv_cache": "kv",
           "overhead": "ovh",
           "total": "total", "card": "card", "headroom": "headroom", "kv_tokens": "kv tokens"}


def table(rows: list[dict]) -> str:
    """`report`'s rows as a fixed-width table (a blank cell: the actor has no such part)."""
    def cell(row: dict, c: str) -> str:
        v = row.get(c)
        return "" if v is None else f"{v:.1%}" if c == "headroom" else f"{v:,}" if c == "kv_tokens" else f"{v:.1f}"
    lines = [f"{'actor (GB per GPU)':<20}" + "".join(f"{h:>10}" for h in COLUMNS.values())]
    return "\n".join(lines + [f"{r['name']:<20}" + "".join(f"{cell(r, c):>10}" for c in COLUMNS) for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piplay_ray.cluster.gpu_memory")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--card-gb", type=float, default=80.0)
    ap.add_argument("--min-headroom", type=float, default=0.10)
    try:
        ns = ap.parse_intermixed_args(argv)
        cfg = load_config(ns.config, ns.overrides)
        rows = report(cfg, ns.card_gb)
    except SystemExit as e:  # argparse's usage error
        return int(e.code or 0)
    except ValueError as e:  # ConfigError, or a model the table does not know
        print(f"piplay: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    bad = problems(cfg, ns.card_gb, ns.min_headroom)
    print("\n".join(["", *bad]) if bad else f"\nfits: every actor keeps >= {ns.min_headroom:.0%} headroom")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
