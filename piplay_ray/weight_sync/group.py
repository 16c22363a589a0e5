"""A process group built straight from a TCP store, for weight broadcasts.

torch's `ProcessGroupGloo` / `ProcessGroupNCCL` constructors take a store, a rank and a size and need no
default process group, so a group of the learner's rank 0 and a role's receivers lives beside DeepSpeed's
and vLLM's own groups in the same processes. The backend follows the device (NCCL for CUDA tensors, gloo
otherwise); rendezvous, ranks and every broadcast are the same code on both. The learner's rank 0 hosts
the store: a new store (new port) is a new *generation* of the group, which is how members that restarted
rejoin.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Rendezvous:
    """Where a generation of a role's group meets; travels as a plain dict (vLLM's RPC takes no classes)."""

    host: str
    port: int
    world: int
    generation: int
    timeout_s: float
    backend: str = "auto"  # auto: by device; gloo also carries CUDA tensors (through host memory)
    transport: str = "collective"  # the sender's transport: receivers take its receiving side (receiver_for)

    def ticket(self, rank: int, version: int) -> dict:
        """What one member needs for one sync: the rendezvous, its first rank and the version sent."""
        return {**asdict(self), "rank": rank, "version": version}

    @classmethod
    def of(cls, ticket: dict) -> Rendezvous:
        return cls(ticket["host"], int(ticket["port"]), int(ticket["world"]), int(ticket["generation"]),
                   float(ticket["timeout_s"]), ticket.get("backend", "auto"), ticket.get("transport", "collective"))


def backend_for(device: torch.device, setting: str = "auto") -> str:
    if setting != "auto":
        return setting
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def host_store(host: str, world: int, timeout_s: float):
    """The master store of a new generation on a free port (rank 0 keeps it alive); returns (store, port)."""
    from torch.distributed import TCPStore

    store = TCPStore(host, 0, world, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=timeout_s))
    return store, store.port


def make_group(rdv: Rendezvous, rank: int, device: torch.device, store=None):
    """Join generation `rdv` as `rank`; blocks until all `rdv.world` ranks have joined (or the timeout)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=rdv.timeout_s)
    if store is None:
        store = dist.TCPStore(rdv.host, rdv.port, rdv.world, is_master=False, timeout=timeout)
    if not 0 <= rank < rdv.world:
        raise ValueError(f"weight-sync rank {rank} outside a group of {rdv.world}")
    if backend_for(device, rdv.backend) == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, rdv.world, opts), store
    return dist.ProcessGroupGloo(store, rank, rdv.world, timeout), store
