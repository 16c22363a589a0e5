"""Weight sync between processes that share one device: receivers map the sender's bucket and copy from it.

On one GPU NCCL refuses two ranks and gloo goes through host memory (~1 GB/s measured on an H200). Here the
sender packs each bucket into a buffer on its GPU and sends a CUDA IPC handle for it; every receiver opens
the handle (the same device memory), copies the tensors into its parameters in place and says so, and only
then may the sender reuse the buffer. Everything else is the collective transport's code: the group (gloo,
on CPU tensors: it carries only frames and acknowledgements), the frames and their order, versions,
generations, the ring of at most two buffers, and the failure rules (a stalled or dead peer raises
`SyncError` on every member within `timeout_s`).

The CPU twin, which the tests run: a bucket lives in named POSIX shared memory (`/dev/shm`) and the handle
is its name. It differs from CUDA in two ways, both here: a tensor larger than a bucket is copied into a
buffer of its size (a CPU tensor cannot be shared after the fact; a CUDA one can), and the receiver maps the
segment by name instead of opening an IPC handle.
"""

from __future__ import annotations

import base64
import os
import uuid
from multiprocessing import shared_memory

import torch

from .base import BucketRing, SyncError
from .collective import CollectiveTransport
from .collective import Receiver as CollectiveReceiver
from .group import Rendezvous

SHM = "/dev/shm"  # where POSIX shared memory names live on Linux


def _b64(x: bytes) -> str:
    return base64.b64encode(x).decode()


def _unb64(x: str) -> bytes:
    return base64.b64decode(x)


class SharedBuffers:
    """The sender's bucket buffers: on CUDA plain device tensors (any can be exported), on CPU named shared
    memory segments, unlinked at `close` (and by Python's resource tracker if the sender dies), named
    `piplay-ipc-<pid>-...` so a leftover says whose it was."""

    def __init__(self, device: torch.device):
        self.device = device
        self._segments: dict[int, shared_memory.SharedMemory] = {}  # data_ptr -> its segment (CPU)

    def alloc(self, size: int) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.empty(size, dtype=torch.uint8, device=self.device)
        seg = shared_memory.SharedMemory(f"piplay-ipc-{os.getpid()}-{uuid.uuid4().hex[:12]}", create=True,
                                         size=max(size, 1))
        buf = torch.frombuffer(seg.buf, dtype=torch.uint8, count=size)
        self._segments[buf.data_ptr()] = seg
        return buf

    def handle(self, buf: torch.Tensor) -> dict:
        """What a receiver needs to map `buf`: its storage's handle and where in it `buf` starts."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the packing copies are done
            share = buf.untyped_storage()._share_cuda_()
            return {"cuda": [_b64(x) if isinstance(x, bytes) else x for x in share], "at": buf.storage_offset(),
                    "uuid": str(torch.cuda.get_device_properties(self.device).uuid)}
        return {"shm": self._segments[buf.data_ptr()].name, "at": 0}

    def close(self) -> None:
        for seg in self._segments.values():
            seg.unlink()
            try:
                seg.close()
            except BufferError:  # a view is still held (a sync cut short): unmapped when it goes
                pass
        self._segments = {}
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()  # blocks whose importers have let go go back to the allocator


class IpcReceiver(CollectiveReceiver):
    """Maps each bucket the sender announces, yields views of it, acknowledges when they were taken."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__("cpu")  # frames and acknowledgements over gloo
        self.target = torch.device(device)
        self._mapped: dict[str, torch.Tensor] = {}  # handle key -> the mapped storage, for this sync

    def _bucket(self, ring: BucketRing, size: int, frame: dict) -> torch.Tensor:
        handle = frame["handle"]
        key = handle.get("shm") or f"{handle['cuda'][1]}@{handle['cuda'][3]}"
        if key not in self._mapped:
            self._mapped[key] = self._map(handle)
        buf = self._mapped[key][handle["at"]: handle["at"] + size]
        ring.peak = max(ring.peak, sum(t.numel() for t in self._mapped.values()))
        return buf

    def _map(self, handle: dict) -> tuple:
        if "shm" in handle:  # mapped as a file: a SharedMemory here would make it ours to unlink at exit
            path = os.path.join(SHM, handle["shm"])
            return torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)
        if self.target.type != "cuda":
            raise SyncError("weight sync ipc: the sender's buckets are on a GPU, this receiver on the CPU")
        share = [_unb64(x) if i in (1, 4, 6) else x for i, x in enumerate(handle["cuda"])]
        share[0] = _local_index(handle["uuid"])
        storage = torch.UntypedStorage._new_shared_cuda(*share)
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{share[0]}").set_(storage)

    def _consumed(self) -> None:
        if self.target.type == "cuda":
            torch.cuda.current_stream(self.target).synchronize()  # our copies out of the bucket are done
        self.wait(self.start_barrier())

    def _ended(self) -> None:
        self._mapped = {}  # unmapped (CUDA: the handle closed) once the caller's views are gone too


class IpcTransport(CollectiveTransport):
    """Sender: frames over gloo, buckets by handle; a slot is reused once every receiver acknowledged it."""

    name = "ipc"
    receiver = IpcReceiver

    def __init__(self, bucket_mb: int = 256, device: torch.device | str = "cpu"):
        super().__init__(bucket_mb)  # the group's member on CPU: gloo carries frames and acknowledgements
        self.device = torch.device(device)
        self._buffers: SharedBuffers | None = None
        self._held: list[torch.Tensor] = []

    @property
    def pass_through(self) -> bool:
        """A tensor larger than a bucket travels as itself on CUDA (any device memory exports); the CPU twin
        copies it into shared memory."""
        return self.device.type == "cuda"

    def open(self, host: str, world: int, generation: int, timeout_s: float, backend: str = "auto") -> Rendezvous:
        return super().open(host, world, generation, timeout_s, "gloo")

    def publish(self, version, named):
        self._buffers = SharedBuffers(self.device)
        try:
            return super().publish(version, named)
        finally:
            self._held = []
            self._buffers.close()
            self._buffers = None

    def _ring(self) -> BucketRing:
        return BucketRing(self.device, slots=2, wait=self.member.wait, alloc=self._buffers.alloc)

    def _describe(self, buf: torch.Tensor) -> dict:
        return {"handle": self._buffers.handle(buf)}

    def _send(self, buf: torch.Tensor):
        """The acknowledgement every receiver joins once it has copied the bucket out."""
        self._held = [*self._held[-1:], buf]  # a passed-through tensor stays alive until acknowledged
        return self.member.start_barrier()


def _local_index(uuid: str) -> int:
    """This process's index of the GPU the sender's handle is on: members must share a device."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise SyncError(f"weight sync ipc: the sender's GPU {uuid} is not visible here; ipc needs every member of "
                    "the group on the sender's GPU (use weight_sync.transport: collective)")
