"""Benchmark one weight sync: DeepSpeed learner -> two rollout workers, per transport.

For each model, a 1-rank learner group publishes its weights and two Ray actors each holding a rollout
engine load them. `object_store`: gathered, packed into buckets, put once, each worker maps and loads them
(`update_weights(version, bundle)`). `collective`: the learner's rank 0 broadcasts the buckets in the role's
process group (gloo on CPU) while both workers receive and load them (`GroupSync.sync`). `ipc`: the same
sync, each bucket passed as a handle the workers map (CUDA IPC; on CPU named shared memory). The figure to beat
is a plain in-memory copy of the same number of bytes, measured in the same process right after: the
transport cannot go faster than memory bandwidth.

    python bench/weight_sync.py [--models tiny,smollm2] [--engine transformers|vllm] [--repeats 3]
                                [--transports object_store,collective,ipc]

With `--lora-rank R` (default 16; 0 = off) every model and transport is also run with `learner.lora.rank=R`
on every linear layer and engines serving LoRA: the sync then moves only the adapter, and its line gives the
bytes and seconds against the full-weight sync of the same model (`vs_full`).

Each line also gives the peak extra memory of the sync's bucket buffers (`publish_buffer_peak` on the
learner, `receive_buffer_peak` on a receiver, bytes) next to `bucket_bytes` (`--bucket-mb`, 32 by default:
below the models' size, so a sender keeping every bucket would show the whole model there).

Prints one JSON line per model, transport and form, then a final JSON line with all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ray
import torch

from piplay_ray import assets
from piplay_ray.config import load_config
from piplay_ray.learner.learner import LearnerGroup


@ray.remote(num_cpus=0.5)
class Worker:
    """A stand-in rollout worker: a real engine that takes the learner's bundle."""

    def __init__(self, kind: str, path: str, rollout_cfg: dict, lora: dict | None = None):
        from piplay_ray.config import LoraConfig, RolloutConfig
        from piplay_ray.engines import make_engine

        self.engine = make_engine(kind, path, RolloutConfig.model_validate(rollout_cfg), dtype="float32",
                                  lora=LoraConfig.model_validate(lora) if lora else None)

    def weight_form(self) -> str:
        return self.engine.weight_form

    def update_weights(self, version: int, bundle) -> float:
        t0 = time.perf_counter()
        self.engine.update_weights(version, bundle)
        return time.perf_counter() - t0

    def sync_member(self) -> tuple[str, int, int]:
        return "bench", self.engine.group_ranks, self.engine.version

    def receive_weights(self, ticket: dict) -> int:
        import asyncio

        return asyncio.run(self.engine.areceive_weights(ticket))

    def receive_peak(self) -> int | None:
        """The most bucket bytes the engine's receiver held at once in its last sync (transformers engine)."""
        return getattr(getattr(self.engine, "_receiver", None), "peak", None)

    def shutdown(self) -> None:
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


def memcpy_gbps(nbytes: int, repeats: int = 5) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _object_store_run(group, workers, form: str) -> dict:
    t0 = time.perf_counter()
    bundle = group.weights("student", form=form)
    t1 = time.perf_counter()
    loads = ray.get([w.update_weights.remote(bundle.version, bundle) for w in workers])
    t2 = time.perf_counter()
    run = {"publish_s": t1 - t0, "pack_s": bundle.publish_s, "receive_s": t2 - t1, "seconds": t2 - t0,
           "worker_load_s": max(loads), "bytes": bundle.nbytes, "buckets": len(bundle.refs),
           "publish_buffer_peak": bundle.meta["buffer_peak"]}
    del bundle
    return run


def _collective_run(sync) -> dict:
    import asyncio

    sync.pool.version = -1  # else a resync of workers already current is skipped
    done = asyncio.run(sync.sync(None))
    receive_peaks = [p for p in ray.get([w.receive_peak.remote() for w in sync.pool.workers]) if p is not None]
    return {"seconds": done["seconds"], "bytes": done["bytes"], "generation": done["generation"],
            "publish_buffer_peak": done["buffer_peak"], "receive_buffer_peak": max(receive_peaks, default=None)}


def bench_model(name: str, engine: str, repeats: int, transport: str, lora_rank: int = 0, bucket_mb: int = 32) -> dict:
    from types import SimpleNamespace

    from piplay_ray.weight_sync.coordinator import GroupSync

    path = assets.resolve_model(f"builtin:{name}")
    cfg = load_config("configs/tiny.yaml", [f"model.base={path}", "learner.world_size=1",
                                            f"weight_sync.transport={transport}", f"learner.lora.rank={lora_rank}",
                                            f"weight_sync.bucket_mb={bucket_mb}",
                                            f"learner.lora.alpha={2 * max(lora_rank, 1)}"])
    group = LearnerGroup(cfg, roles=("student",))
    lora = cfg.learner.lora.model_dump() if lora_rank else None
    workers = [Worker.remote(engine, path, cfg.rollout.model_dump(), lora) for _ in range(2)]
    forms = set(ray.get([w.weight_form.remote() for w in workers]))
    form = "adapter" if forms == {"adapter"} else "full"
    pool = SimpleNamespace(workers=workers, version=-1, weight_form=lambda: form)
    sync = GroupSync("student", group, pool, None, retries=0, transport=transport)
    try:
        best = None
        for _ in range(repeats):  # the first collective sync also forms the group; the best run counts
            run = _object_store_run(group, workers, form) if transport == "object_store" else _collective_run(sync)
            run["memcpy_gbps"] = memcpy_gbps(run["bytes"])  # right after, under the same machine load
            if best is None or run["seconds"] < best["seconds"]:
                best = run
        ray.get([w.shutdown.remote() for w in workers])
    finally:
        for w in workers:
            ray.kill(w)
        group.shutdown()
    copy = best.pop("memcpy_gbps")
    gbps = best["bytes"] / best["seconds"] / 1e9
    return {"model": name, "transport": transport, "form": form, "lora_rank": lora_rank,
            "bucket_bytes": bucket_mb << 20,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()},
            "gbps": round(gbps, 3), "delivered_gbps": round(2 * gbps, 3),
            "memcpy_gbps": round(copy, 3), "ratio": round(gbps / copy, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transports", default="object_store,collective,ipc")
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=16, help="also run LoRA syncs at this rank (0: only full)")
    ap.add_argument("--bucket-mb", type=int, default=32, help="weight_sync.bucket_mb: below the model's size, so "
                    "the buffers' peak shows against the bucket")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    results = []
    try:
        for name in args.models.split(","):
            for transport in args.transports.split(","):
                full = bench_model(name.strip(), args.engine, args.repeats, transport.strip(), 0, args.bucket_mb)
                results.append(full)
                print(json.dumps(full), flush=True)
                if args.lora_rank:
                    r = bench_model(name.strip(), args.engine, args.repeats, transport.strip(), args.lora_rank,
                                    args.bucket_mb)
                    r["vs_full"] = {"bytes_ratio": round(r["bytes"] / full["bytes"], 5),
                                    "seconds_ratio": round(r["seconds"] / full["seconds"], 4),
                                    "full_bytes": full["bytes"], "full_seconds": full["seconds"]}
                    results.append(r)
                    print(json.dumps(r), flush=True)
    finally:
        ray.shutdown()
    print(json.dumps({"bench": "weight_sync", "engine": args.engine, "receivers": 2,
                      "results": {f"{r['model']}/{r['transport']}/{r['form']}": r for r in results}}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
