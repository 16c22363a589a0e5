"""The rank environment of one learner rank, derived from the devices Ray gives it (pure, so it is tested
without GPUs), the cleanup of what DeepSpeed's CPU all-reduce leaves in /dev/shm, and the pinning of its
threads to cores (`learner.cpu_cores`).

DeepSpeed picks its device from `LOCAL_RANK`, which must name the rank's own GPU as this process sees it
(`cluster.devices.select`: index 0 by default, its real index under NOSET), not its position among the
learner ranks on the node. On CPU the device index is unused and `LOCAL_RANK` is the node-local rank.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence

from piplay_ray.cluster import devices


def rank_env(rank: int, world_size: int, node_rank: int, node_size: int, master_addr: str, master_port: int,
             gpu_ids: Sequence[str | int], env: Mapping[str, str]) -> tuple[dict[str, str], int | None]:
    """torch.distributed/DeepSpeed variables for this rank and the CUDA device index (None on CPU).

    `node_rank`/`node_size`: this rank's position among the learner ranks on its node, and their count.
    """
    device = devices.select(gpu_ids, env).index
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


def pin_threads(cores: Sequence[int]) -> None:
    """Pin every thread of this process (torch's pools already exist) and those it starts later to `cores`
    (`learner.cpu_cores`): Linux's affinity is per thread, and a new thread inherits its creator's."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass
