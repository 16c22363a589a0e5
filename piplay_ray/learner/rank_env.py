"""The rank environment of one learner rank, derived from the devices Ray gives it. Pure, so it is tested
without GPUs.

DeepSpeed picks its device from `LOCAL_RANK`. By default Ray sets `CUDA_VISIBLE_DEVICES` to the rank's own
GPU, so inside the process that GPU is index 0 whatever the rank's position on the node; a node-local rank
there names a device that does not exist. With `RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES` Ray leaves the
variable alone and the rank must use its GPU's real index (its position in `CUDA_VISIBLE_DEVICES` when that
is set, else the id Ray reports). On CPU the device index is unused and `LOCAL_RANK` is the node-local rank.
"""

from __future__ import annotations

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
