"""One-node weight sync through the Ray object store (shared memory).

The learner packs parameters into a few contiguous buckets and `ray.put`s each once; every receiver on
the node maps the same shared-memory pages (`ray.get` of a numpy array is zero-copy), so N receivers cost
one write, not N, and `named_tensors()` needs one `ray.get` per bucket, none per tensor.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .base import BucketRing, TensorSpec, Transport, pack_buckets, unpack_bucket


@dataclass
class ObjectStoreBundle:
    version: int
    refs: list  # one ray.ObjectRef per bucket (a uint8 numpy array)
    specs: list[list[TensorSpec]]
    nbytes: int
    publish_s: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [s.name for bucket in self.specs for s in bucket]

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Read-only tensor views into shared memory: copy them into your parameters, do not keep them."""
        import ray

        for ref, specs in zip(self.refs, self.specs, strict=True):
            arr = ray.get(ref)
            with warnings.catch_warnings():  # the shared-memory array is read-only; receivers only read it
                warnings.simplefilter("ignore", UserWarning)
                buf = torch.from_numpy(arr)
            yield from unpack_bucket(buf, specs)


class ObjectStoreTransport(Transport):
    name = "object_store"
    in_shared_memory = True

    def __init__(self, bucket_mb: int = 256, device: torch.device | str = "cpu"):
        super().__init__(bucket_mb)  # buckets go to host memory whatever the parameters' device

    def publish(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> ObjectStoreBundle:
        import ray

        t0 = time.perf_counter()
        refs, specs, nbytes = [], [], 0
        ring = BucketRing(slots=1)  # ray.put copies each bucket out at once: one buffer serves them all
        for buf, bucket_specs in pack_buckets(named, self.bucket_bytes, ring):
            refs.append(ray.put(buf.numpy()))
            specs.append(bucket_specs)
            nbytes += sum(s.nbytes for s in bucket_specs)
        return ObjectStoreBundle(version=version, refs=refs, specs=specs, nbytes=nbytes,
                                 publish_s=time.perf_counter() - t0, meta={"buffer_peak": ring.peak})
