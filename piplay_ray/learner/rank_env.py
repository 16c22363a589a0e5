"""The rank environment of one learner rank, derived from the devices Ray gives it (pure, so it is tested
without GPUs), and the cleanup of what DeepSpeed's CPU all-reduce leaves in /dev/shm.

DeepSpeed picks its device from `LOCAL_RANK`. By default Ray sets `CUDA_VISIBLE_DEVICES` to the rank's own
GPU, so inside the process that GPU is index 0 whatever the rank's position on the node; a node-local rank
there names a device that does not exist. With `RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES` Ray leaves the
variable alone and the rank must use its GPU's real index (its position in `CUDA_VISIBLE_DEVICES` when that
is set, else the id Ray reports). On CPU the device index is unused and `LOCAL_RANK` is the node-local rank.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence

NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def device_index(gpu_ids: Sequence[str | int], env: Mapping[str, str]) -> int | None:
    """The CUDA device index this process should use, or None on CPU (`gpu_ids`: `ray.get_gpu_ids()`)."""
    if not gpu_ids:
        return None
    if env.get(NOSET, "") not in ("", "0"):
        first = str(gpu_ids[0])
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if not visible:
            return int(first)
        if first not in visible:
            raise ValueError(f"Ray gave GPU {first}, which CUDA_VISIBLE_DEVICES={','.join(visible)} does not list")
        return visible.index(first)
    return 0  # Ray made the rank's own GPU(s) the only visible ones


def rank_env(rank: int, world_size: int, node_rank: int, node_size: int, master_addr: str, master_port: int,
             gpu_ids: Sequence[str | int], env: Mapping[str, str]) -> tuple[dict[str, str], int | None]:
    """torch.distributed/DeepSpeed variables for this rank and the CUDA device index (None on CPU).

    `node_rank`/`node_size`: this rank's position among the learner ranks on its node, and their count.
    """
    device = device_index(gpu_ids, env)
    local = node_rank if device is None else device
    return ({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
             "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local), "LOCAL_SIZE": str(node_size),
             "CROSS_RANK": "0", "CROSS_SIZE": "1"}, device)


def unlink_shm_buffers(master_addr: str | None, master_port: str | None) -> None:
    """Unlink DeepSpeed's CPU all-reduce buffers of the group at `master_addr:master_port` in /dev/shm (RAM):
    DeepSpeed never deletes them; once every rank has mapped them the names can go."""
    if not (master_addr and master_port):
        return
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{master_addr}_{master_port}_*"):
        try:
            os.unlink(f)
        except OSError:
            pass
