"""Weight sync as a broadcast in one process group per role (learner rank 0 -> every engine worker + teacher).

The sender packs the gathered parameters (training dtype, on its device) into buckets and broadcasts them as
frames: an int64 head `[version, bucket bytes, frame bytes]`, the bucket's tensor specs (JSON), the bucket;
a head with bucket bytes -1 ends the sync. A receiver turns the frames back into `(name, tensor)` views one
bucket at a time and loads them in place (vLLM `reload_weights`, a transformers state dict, the teacher's
EMA), so nothing touches a file or the object store. Every frame carries the version, and a receiver
refuses a sync whose version is not the one its ticket names.

All members must take part in every sync of their group (a broadcast waits for everyone): a receiver that
has nothing to load still drains the frames (`drain`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from . import base
from .base import BucketRing, SyncError, TensorSpec, Transport, pack_buckets, unpack_bucket
from .group import Rendezvous, backend_for, host_store, make_group

END = -1
POLL_S = 0.002


class Member:
    """One process's place in a role's group; (re)joins whenever a ticket names another generation or rank.

    Every collective it runs ends within the group's `timeout_s` or raises `SyncError`: gloo's own timeout
    blocks and raises; an NCCL work returns to the CPU at once, so `wait` polls it against the deadline and
    aborts the communicator when a peer never comes (NCCL's watchdog is set to fire later, so it never tears
    the process down first). A group left (a sync failed, a new generation) is aborted, not just dropped.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.version: int | None = None  # the version of the last sync received (receivers)
        self._key: tuple | None = None
        self._pg = None
        self._store = None
        self._timeout_s = 0.0
        self._polled = False  # NCCL: poll works against the deadline

    @property
    def generation(self) -> int | None:
        return None if self._key is None else self._key[0].generation

    def join(self, rdv: Rendezvous, rank: int, store=None):
        if self._key != (rdv, rank):
            self.leave()
            try:
                self._pg, self._store = make_group(rdv, rank, self.device, store)
            except RuntimeError as e:  # a peer that never joined: the store's timeout
                raise SyncError(f"weight sync: joining generation {rdv.generation} as rank {rank}: {e}") from e
            self._key, self._timeout_s = (rdv, rank), rdv.timeout_s
            self._polled = backend_for(self.device, rdv.backend) == "nccl"
        return self._pg

    def leave(self) -> None:
        pg, self._pg, self._store, self._key = self._pg, None, None, None
        if pg is not None:
            try:
                pg.abort()  # NCCL: frees the communicator and unblocks its kernels; gloo: closes its pairs
            except Exception:  # a backend without abort, or one already torn down
                pass

    def wait(self, work) -> None:
        """Wait for a collective `work` to finish, or raise `SyncError` within the group's timeout."""
        try:
            if self._polled:
                deadline = time.monotonic() + self._timeout_s
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        self.leave()
                        raise SyncError(f"weight sync: no peer progress for {self._timeout_s:g} s "
                                        "(communicator aborted)")
                    time.sleep(POLL_S)
            work.wait()
        except SyncError:
            raise
        except RuntimeError as e:  # gloo: timed out, or a peer closed its connection
            raise SyncError(f"weight sync: {e}") from e

    def broadcast(self, t: torch.Tensor) -> None:
        self.wait(self.start_broadcast(t))

    def start_broadcast(self, t: torch.Tensor):
        """An asynchronous broadcast from rank 0; `wait` on the returned work before touching `t`."""
        try:
            return self._pg.broadcast(t, 0)
        except RuntimeError as e:
            raise SyncError(f"weight sync: {e}") from e

    def start_barrier(self):
        """An asynchronous barrier of the whole group (an allreduce of one number); `wait` on it."""
        try:
            return self._pg.allreduce([torch.zeros(1, device=self.device)])
        except RuntimeError as e:
            raise SyncError(f"weight sync: {e}") from e


class Receiver(Member, base.Receiver):
    peak = 0  # the most bucket bytes the last sync held at once

    def receive(self, ticket: dict, rank_offset: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights of `ticket['version']` as they arrive, one bucket at a time; consume it to the end.
        Each tensor is a view into the one bucket buffer, valid until the next tensor of a later bucket is
        asked for: copy it into place (every loader does) or clone it to keep it. The buffer is freed when
        the sync ends. A ticket whose version is None takes the version the sender holds (a resync);
        `self.version` says which arrived."""
        self.join(Rendezvous.of(ticket), int(ticket["rank"]) + rank_offset)
        want = ticket.get("version")
        ring = BucketRing(self.device, slots=1, wait=self.wait)
        try:
            while True:
                head = torch.zeros(3, dtype=torch.int64, device=self.device)
                self.broadcast(head)
                version, size, frame_bytes = (int(x) for x in head.tolist())
                if want is not None and version != int(want):
                    raise RuntimeError(f"weight sync: received version {version}, expected {want}")
                self.version = version
                if size == END:
                    return
                raw = torch.empty(frame_bytes, dtype=torch.uint8, device=self.device)
                self.broadcast(raw)
                frame = json.loads(bytes(raw.cpu().tolist()))
                specs = [TensorSpec(n, d, tuple(s), o, b) for n, d, s, o, b in frame["specs"]]
                yield from unpack_bucket(self._bucket(ring, size, frame), specs)
                self._consumed()
        except BaseException:
            self.leave()  # a sync cut short leaves the group out of step: rejoin at the next generation
            raise
        finally:
            self.peak = ring.peak
            self._ended()
            ring.release()

    # what a transport that moves buckets another way (ipc.py) changes; the frames and their order stay
    def _bucket(self, ring: BucketRing, size: int, frame: dict) -> torch.Tensor:
        """The bucket the frame announced: broadcast into the ring's buffer."""
        buf = ring.take(size)
        self.broadcast(buf)
        return buf

    def _consumed(self) -> None:
        """Every tensor of the last bucket was taken."""

    def _ended(self) -> None:
        """The sync ended (or failed): let go of what it held."""


@dataclass
class CollectiveReceipt:
    """What `publish` returns: the weights were broadcast to every member of the group during the call."""

    version: int
    nbytes: int
    names: list[str]
    publish_s: float
    generation: int
    meta: dict = field(default_factory=dict)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise RuntimeError("collective weights were broadcast to the group's members during publish; "
                           "members receive them with weight_sync.collective.Receiver")


class CollectiveTransport(Transport):
    name = "collective"
    pushes = True

    receiver = Receiver

    def __init__(self, bucket_mb: int = 256, device: torch.device | str = "cpu"):
        super().__init__(bucket_mb)
        self.member = Member(device)
        self.device = self.member.device  # where the buckets are packed
        self.rdv: Rendezvous | None = None
        self._store = None

    def open(self, host: str, world: int, generation: int, timeout_s: float, backend: str = "auto") -> Rendezvous:
        """Start a new generation of the group (a fresh store); members join it at the next publish."""
        self.member.leave()
        self._store, port = host_store(host, world, timeout_s)
        self.rdv = Rendezvous(host, port, world, generation, timeout_s, backend, self.name)
        return self.rdv

    def publish(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> CollectiveReceipt:
        """Send every bucket to the group; the ring's buffers are freed when the sync ends
        (`receipt.meta['buffer_peak']`)."""
        if self.rdv is None:
            raise RuntimeError("collective transport: open() a group generation before publishing")
        t0 = time.perf_counter()
        member, dev = self.member, self.member.device
        ring = self._ring()
        try:
            member.join(self.rdv, 0, self._store)
            names, nbytes, sending = [], 0, None
            for buf, specs in pack_buckets(named, self.bucket_bytes, ring, device=self.device,
                                           pass_through=self.pass_through):
                if sending is not None:
                    member.wait(sending)
                frame = {"specs": [[s.name, s.dtype, list(s.shape), s.offset, s.nbytes] for s in specs],
                         **self._describe(buf)}
                raw = json.dumps(frame).encode()
                member.broadcast(torch.tensor([version, buf.numel(), len(raw)], dtype=torch.int64, device=dev))
                member.broadcast(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dev))
                sending = self._send(buf)
                ring.sent(sending)
                names += [s.name for s in specs]
                nbytes += sum(s.nbytes for s in specs)
            ring.flush()
            member.broadcast(torch.tensor([version, END, 0], dtype=torch.int64, device=dev))
        except BaseException:
            member.leave()
            raise
        finally:
            ring.release()
        return CollectiveReceipt(version=version, nbytes=nbytes, names=names, publish_s=time.perf_counter() - t0,
                                 generation=self.rdv.generation, meta={"buffer_peak": ring.peak})

    # what a transport that moves buckets another way (ipc.py) changes; the frames and their order stay
    pass_through = True  # a tensor larger than a bucket may travel as itself (pack_buckets)

    def _ring(self) -> BucketRing:
        """Two buffers: the next bucket is gathered and packed while the previous one is on the wire."""
        return BucketRing(self.device, slots=2, wait=self.member.wait)

    def _describe(self, buf: torch.Tensor) -> dict:
        """What the frame tells receivers about the bucket beyond its specs."""
        return {}

    def _send(self, buf: torch.Tensor):
        """Start moving the bucket; the returned work completes when its buffer may be reused."""
        return self.member.start_broadcast(buf)
