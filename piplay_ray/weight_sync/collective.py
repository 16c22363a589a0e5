"""Weight sync as a broadcast in one process group per role (learner rank 0 -> every engine worker + teacher).

The sender packs the gathered parameters (training dtype, on its device) into buckets and broadcasts them as
frames: an int64 head `[version, bucket bytes, spec bytes]`, the bucket's tensor specs (JSON), the bucket;
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
from .base import TensorSpec, Transport, pack_buckets, unpack_bucket
from .group import Rendezvous, host_store, make_group

END = -1


class Member:
    """One process's place in a role's group; (re)joins whenever a ticket names another generation or rank."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.version: int | None = None  # the version of the last sync received (receivers)
        self._key: tuple | None = None
        self._pg = None
        self._store = None

    @property
    def generation(self) -> int | None:
        return None if self._key is None else self._key[0].generation

    def join(self, rdv: Rendezvous, rank: int, store=None):
        if self._key != (rdv, rank):
            self.leave()
            self._pg, self._store = make_group(rdv, rank, self.device, store)
            self._key = (rdv, rank)
        return self._pg

    def leave(self) -> None:
        self._pg = self._store = self._key = None

    def broadcast(self, t: torch.Tensor) -> None:
        self._pg.broadcast(t, 0).wait()

    def start_broadcast(self, t: torch.Tensor):
        """An asynchronous broadcast from rank 0; `.wait()` on the returned work before touching `t`."""
        return self._pg.broadcast(t, 0)


class Receiver(Member, base.Receiver):
    def receive(self, ticket: dict, rank_offset: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights of `ticket['version']` as they arrive, one bucket at a time; consume it to the end.
        A ticket whose version is None takes the version the sender holds (a resync); `self.version` says
        which arrived."""
        self.join(Rendezvous.of(ticket), int(ticket["rank"]) + rank_offset)
        want = ticket.get("version")
        try:
            while True:
                head = torch.zeros(3, dtype=torch.int64, device=self.device)
                self.broadcast(head)
                version, size, spec_bytes = (int(x) for x in head.tolist())
                if want is not None and version != int(want):
                    raise RuntimeError(f"weight sync: received version {version}, expected {want}")
                self.version = version
                if size == END:
                    return
                raw = torch.empty(spec_bytes, dtype=torch.uint8, device=self.device)
                self.broadcast(raw)
                specs = [TensorSpec(n, d, tuple(s), o, b) for n, d, s, o, b in json.loads(bytes(raw.cpu().tolist()))]
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)  # fresh: loaders may keep views
                self.broadcast(buf)
                yield from unpack_bucket(buf, specs)
        except BaseException:
            self.leave()  # a sync cut short leaves the group out of step: rejoin at the next generation
            raise


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

    def __init__(self, bucket_mb: int = 256, device: torch.device | str = "cpu"):
        super().__init__(bucket_mb)
        self.member = Member(device)
        self.rdv: Rendezvous | None = None
        self._store = None
        self._scratch: list[torch.Tensor] = []

    def open(self, host: str, world: int, generation: int, timeout_s: float, backend: str = "auto") -> Rendezvous:
        """Start a new generation of the group (a fresh store); members join it at the next publish."""
        self.member.leave()
        self._store, port = host_store(host, world, timeout_s)
        self.rdv = Rendezvous(host, port, world, generation, timeout_s, backend)
        return self.rdv

    def publish(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> CollectiveReceipt:
        if self.rdv is None:
            raise RuntimeError("collective transport: open() a group generation before publishing")
        t0 = time.perf_counter()
        member, dev = self.member, self.member.device
        try:
            member.join(self.rdv, 0, self._store)
            names, nbytes, sending = [], 0, None
            # each bucket has its own scratch buffer, so the next one is gathered and packed while the
            # previous one is still on the wire
            for buf, specs in pack_buckets(named, self.bucket_bytes, self._scratch, device=dev):
                if sending is not None:
                    sending.wait()
                raw = json.dumps([[s.name, s.dtype, list(s.shape), s.offset, s.nbytes] for s in specs]).encode()
                member.broadcast(torch.tensor([version, buf.numel(), len(raw)], dtype=torch.int64, device=dev))
                member.broadcast(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dev))
                sending = member.start_broadcast(buf)
                names += [s.name for s in specs]
                nbytes += sum(s.nbytes for s in specs)
            if sending is not None:
                sending.wait()
            member.broadcast(torch.tensor([version, END, 0], dtype=torch.int64, device=dev))
        except BaseException:
            member.leave()
            raise
        return CollectiveReceipt(version=version, nbytes=nbytes, names=names, publish_s=time.perf_counter() - t0,
                                 generation=self.rdv.generation)
