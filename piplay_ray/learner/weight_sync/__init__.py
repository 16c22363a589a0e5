"""Weight sync from the learner to rollout workers and the teacher: one transport per file.

`object_store` (one node: buckets in Ray's shared memory, pulled by each receiver) and `collective` (a
broadcast in one process group per role, NCCL on GPUs and gloo on CPU, pushed to every member at once).
"""

from . import collective, object_store  # noqa: F401  (each registers its transport)
from .base import TensorSpec, Transport, WeightBundle, pack_buckets, registered, unpack_bucket


def make_transport(kind: str, bucket_mb: int = 256, **kwargs) -> Transport:
    """The transport registered under `kind` (`weight_sync.transport` in the config)."""
    return registered(kind)(bucket_mb=bucket_mb, **kwargs)


__all__ = ["TensorSpec", "Transport", "WeightBundle", "make_transport", "pack_buckets", "unpack_bucket"]
