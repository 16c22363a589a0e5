"""Weight sync from the learner to rollout engines and the teacher: both sides of every transport.

| transport | sender (learner rank 0) | receiver | `pushes` | in /dev/shm |
|---|---|---|---|---|
| `object_store` | packs buckets, `ray.put`s each once; returns a bundle | the bundle (`WeightBundle`): zero-copy views | no | yes |
| `collective` | broadcasts frames to the role's group (NCCL on GPUs, gloo on CPU); returns a receipt | `collective.Receiver` (a `Receiver`) | yes | no |
| `ipc` | the collective's frames over gloo, each bucket as a CUDA IPC handle (CPU: a shared-memory name); for members sharing its device | `ipc.IpcReceiver` | yes | CPU twin only |

A pulling transport's bundle travels to each receiver, which reads it; a pushing one delivers during
`publish` to every member of a role's group, which the driver runs (`coordinator.GroupSync`) so every member
takes part. `base.py` holds both sides' interface (`Transport`; `WeightBundle`, `Receiver`) and the bucket
packing they share, `group.py` the process group of a pushing transport. A new transport is a `base.Transport`
subclass (and its receiving side) in a file of its own and one line in `registry.TRANSPORTS`; this package
never imports a transport until one is asked for.
"""

from __future__ import annotations

from piplay_ray.registry import TRANSPORTS
from piplay_ray.weight_sync.base import (
    Receiver,
    TensorSpec,
    Transport,
    WeightBundle,
    pack_buckets,
    unpack_bucket,
)


def transport_class(kind: str) -> type[Transport]:
    """The transport class `weight_sync.transport` names (for its `pushes` and `in_shared_memory`)."""
    return TRANSPORTS.load(kind)


def receiver_for(ticket: dict, device, held: Receiver | None = None) -> Receiver:
    """The receiving side of the transport that sent `ticket` (a pushing one): `held` when it already is
    one, else a new one on `device`. Receivers keep theirs between syncs (a group is joined once)."""
    cls = transport_class(ticket.get("transport", "collective")).receiver
    return held if type(held) is cls else cls(device)


def make_transport(kind: str, bucket_mb: int = 256, **kwargs) -> Transport:
    """The transport named `kind` (`weight_sync.transport` in the config)."""
    return transport_class(kind)(bucket_mb=bucket_mb, **kwargs)


__all__ = ["Receiver", "TensorSpec", "Transport", "WeightBundle", "make_transport", "pack_buckets", "receiver_for",
           "transport_class", "unpack_bucket"]
