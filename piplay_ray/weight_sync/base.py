"""The weight-sync transport interface, its registry, and the bucket packing both transports share.

A transport turns the learner's full (gathered) parameters, under Hugging Face names, into a *bundle*:
a small picklable object that travels to every receiver (rollout workers, the teacher) and yields
`(name, tensor)` pairs there through `named_tensors()` (object store), or a *receipt* saying the weights were
already broadcast to every member of the role's group (collective). Parameters are packed into a few
contiguous byte buckets so a sync costs a handful of transfers, not one per tensor. This module never
imports a transport; `registry.TRANSPORTS` names them.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

ALIGN = 64  # bytes: every tensor starts aligned, so a dtype view of the bucket is always legal


class SyncError(RuntimeError):
    """A sync cut short by a peer: a stalled or dead member, a timed-out or aborted collective. Every member
    raises it within `weight_sync.timeout_s`; the coordinator retries the sync on a new generation."""


@runtime_checkable
class WeightBundle(Protocol):
    """The receiving side of a pulling transport: the bundle travels to the receiver, which reads it."""

    version: int
    nbytes: int

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...


class Receiver(abc.ABC):
    """The receiving side of a pushing transport: one per receiving process, taking part in each sync."""

    @abc.abstractmethod
    def receive(self, ticket: dict, rank_offset: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights of the sync `ticket` names as they arrive; consume it to the end (every member must)."""

    def drain(self, ticket: dict, rank_offset: int = 0) -> int:
        """Take part in a sync without loading anything; returns the tensors skipped."""
        return sum(1 for _ in self.receive(ticket, rank_offset))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # byte offset in its bucket
    nbytes: int


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dt


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class BucketRing:
    """At most `slots` bucket buffers on one device, handed out in turn; a slot is reused only after the
    transfer that last used it has completed (`sent(work)` records it, `take` waits on it).

    A sync makes one and drops it at the end (`release`), so its extra memory is at most `slots` x the
    largest bucket and nothing outlives the sync (a transport cached per role would otherwise keep every
    bucket of the model: the whole model again). `peak` is the most bucket bytes it held at once.
    """

    def __init__(self, device: torch.device | str = "cpu", slots: int = 2, wait=None, alloc=None):
        self.device, self.slots = torch.device(device), slots
        self._wait = wait or (lambda work: work.wait())
        # alloc(size) -> uint8 tensor: where a slot's memory comes from (ipc on CPU: named shared memory)
        self._alloc = alloc or (lambda size: torch.empty(size, dtype=torch.uint8, device=self.device))
        self._bufs: list[torch.Tensor | None] = [None] * slots
        self._works: list = [None] * slots
        self._i = -1
        self.peak = 0

    def take(self, size: int) -> torch.Tensor:
        """A uint8 buffer of `size` bytes: the next slot, once its last transfer is done."""
        self._i = (self._i + 1) % self.slots
        if self._works[self._i] is not None:
            work, self._works[self._i] = self._works[self._i], None
            self._wait(work)
        buf = self._bufs[self._i]
        if buf is None or buf.numel() < size:
            self._bufs[self._i] = None  # free the small one before allocating its successor
            buf = self._bufs[self._i] = self._alloc(size)
        self.peak = max(self.peak, sum(b.numel() for b in self._bufs if b is not None))
        return buf[:size]

    def sent(self, work) -> None:
        """The buffer last taken is on the wire until `work` completes."""
        self._works[self._i] = work

    def flush(self) -> None:
        """Wait for every transfer still in flight."""
        for i, work in enumerate(self._works):
            if work is not None:
                self._works[i] = None
                self._wait(work)

    def release(self) -> None:
        """Drop every buffer (after `flush`); on a GPU also hand the cached blocks back to the driver, which
        a vLLM worker's allocator would otherwise keep for the rest of the run."""
        self._bufs = [None] * self.slots
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, ring: BucketRing | None = None,
                 device: torch.device | str = "cpu", pass_through: bool = True,
                 ) -> Iterator[tuple[torch.Tensor, list[TensorSpec]]]:
    """Yield (uint8 bucket on `device`, specs) pairs; a tensor larger than `bucket_bytes` is its own bucket
    (with `pass_through`, a byte view of it, not a copy), so packing never holds more than the ring's buffers
    beside the tensors.

    Tensors are consumed one at a time, so a generator that gathers ZeRO-3 shards on demand never holds
    more than one bucket of full parameters. With a `ring` the buckets are its buffers (reused, so a bucket
    is valid until the ring hands its slot out again); without, each is freshly allocated.
    """
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> tuple[torch.Tensor, list[TensorSpec]]:
        buf = (ring.take(size) if ring is not None
               else torch.empty(size, dtype=torch.uint8, device=device))
        specs, off = [], 0
        for name, t in pending:
            n = t.numel() * t.element_size()
            buf[off: off + n].copy_(t.reshape(-1).view(torch.uint8))
            specs.append(TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), off, n))
            off += _aligned(n)
        return buf, specs

    for name, tensor in named:
        t = tensor.detach().to(device).contiguous()
        n = _aligned(t.numel() * t.element_size())
        if pending and size + n > bucket_bytes:
            yield flush()
            pending, size = [], 0
        if n > bucket_bytes and pass_through:  # travels as itself: a copy into a buffer of its size doubles it
            raw = t.numel() * t.element_size()
            yield t.reshape(-1).view(torch.uint8), [TensorSpec(name, str(t.dtype).removeprefix("torch."),
                                                               tuple(t.shape), 0, raw)]
            continue
        pending.append((name, t))
        size += n
    if pending:
        yield flush()


def unpack_bucket(buf: torch.Tensor, specs: Iterable[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into `buf` (no copy) with each tensor's dtype and shape."""
    for s in specs:
        yield s.name, buf[s.offset: s.offset + s.nbytes].view(_dtype(s.dtype)).view(s.shape)


class Transport(abc.ABC):
    """Publishes one version of a policy's weights as a bundle; one subclass per file, named in
    `registry.TRANSPORTS`."""

    name: ClassVar[str]
    # True: `publish` delivers to every member of the role's group, which the driver runs (coordinator.py);
    # False: receivers pull the returned bundle
    pushes: ClassVar[bool] = False
    receiver: ClassVar[type[Receiver] | None] = None  # a pushing transport's receiving side
    in_shared_memory: ClassVar[bool] = False  # bundles live in the node's /dev/shm (cluster.host_memory counts them)

    def __init__(self, bucket_mb: int = 256, device: torch.device | str = "cpu"):
        self.bucket_bytes = int(bucket_mb) << 20

    @abc.abstractmethod
    def publish(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> WeightBundle:
        """Called on the learner's rank 0 with full parameters; the bundle it returns is sent to receivers."""
