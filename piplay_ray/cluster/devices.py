"""Which CUDA devices a GPU actor uses: one rule for learner ranks, rollout engines and the teacher.

By default Ray sets `CUDA_VISIBLE_DEVICES` to the actor's own GPUs, so inside the process they are
`cuda:0..n-1`. With `RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES` Ray leaves the variable alone and every
process sees every GPU of its node: an actor that took `cuda:0` would land on another actor's GPU. Then the
actor's devices are its GPUs' positions in `CUDA_VISIBLE_DEVICES` when that is set, else the ids Ray reports;
and the processes it starts (vLLM's engine core and tensor-parallel workers) are given exactly its GPUs.
Pure over (Ray's GPU ids, the environment), so every case is tested without GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Devices:
    index: int | None  # this process's first CUDA device (`cuda:index`); None on CPU
    child_env: dict[str, str] = field(default_factory=dict)  # set before starting processes that use the GPUs


def select(gpu_ids: Sequence[str | int], env: Mapping[str, str]) -> Devices:
    """The devices of an actor that Ray gave `gpu_ids` (`ray.get_gpu_ids()`), in the environment `env`."""
    if not gpu_ids:
        return Devices(None)
    if env.get(NOSET, "") in ("", "0"):
        return Devices(0)  # Ray made the actor's own GPUs the only visible ones
    ids = [str(g) for g in gpu_ids]
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return Devices(int(ids[0]), {"CUDA_VISIBLE_DEVICES": ",".join(ids)})
    missing = [g for g in ids if g not in visible]
    if missing:
        raise ValueError(f"Ray gave GPU {missing[0]}, which CUDA_VISIBLE_DEVICES={','.join(visible)} does not list")
    return Devices(visible.index(ids[0]), {"CUDA_VISIBLE_DEVICES": ",".join(ids)})


def claim() -> Devices:
    """`select` for the calling Ray actor: the processes it starts from now on see only its GPUs, and a bare
    "cuda" in this process means its first one. Outside Ray (a script on one GPU) the default device."""
    import ray

    if not ray.is_initialized():
        return Devices(0)
    devices = select(ray.get_gpu_ids(), os.environ)
    os.environ.update(devices.child_env)
    if devices.index:  # not 0 (the default device): make it the current one
        import torch

        torch.cuda.set_device(devices.index)
    return devices
