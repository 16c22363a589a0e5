"""Weight sync from the learner to rollout workers and the teacher: one transport per file.

`object_store` (one node: buckets in Ray's shared memory, pulled by each receiver) and `collective` (a
broadcast in one process group per role, NCCL on GPUs and gloo on CPU, pushed to every member at once).
A new transport is a `base.Transport` subclass in a file of its own, named in `TRANSPORTS` (and in the
config's `weight_sync.transport` choices); its module is imported only when it is asked for.
"""

from __future__ import annotations

import importlib

from .base import TensorSpec, Transport, WeightBundle, pack_buckets, unpack_bucket

TRANSPORTS = {"object_store": "object_store:ObjectStoreTransport", "collective": "collective:CollectiveTransport"}


def make_transport(kind: str, bucket_mb: int = 256, **kwargs) -> Transport:
    """The transport named `kind` (`weight_sync.transport` in the config)."""
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown weight_sync.transport {kind!r}; allowed: {', '.join(sorted(TRANSPORTS))}")
    module, name = TRANSPORTS[kind].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(bucket_mb=bucket_mb, **kwargs)


__all__ = ["TRANSPORTS", "TensorSpec", "Transport", "WeightBundle", "make_transport", "pack_buckets",
           "unpack_bucket"]
