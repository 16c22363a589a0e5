"""GPU weight sync over NCCL, through vLLM's native weight-transfer API.

The learner's rank 0 and the vLLM workers of the receiving engines form one NCCL group (learner = rank 0,
workers = ranks 1..). Every publish broadcasts the parameters in packed buckets
(`packed_nccl_broadcast_producer`, `bucket_mb` per buffer) while the engines load them as they arrive, so
no copy of the model ever touches host memory. Unlike the object store this is a push: the receivers must be
connected once (`connect`) and must be Ray actors exposing vLLM's weight-sync methods
(`init_weight_transfer_engine`, `start_weight_update`, `update_weights`, `finish_weight_update`, i.e.
forwarding to an `AsyncLLM` started with `weight_transfer_config={"backend": "nccl"}`). Receivers outside
the group (the teacher) take an object-store bundle of the same version.

Needs CUDA and vLLM; on this project's CPU machines it is exercised only by import.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .base import Transport, register


@dataclass
class NcclReceipt:
    """What `publish` returns: the weights are already loaded on every connected engine."""

    version: int
    nbytes: int
    names: list[str]
    publish_s: float
    meta: dict = field(default_factory=dict)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise RuntimeError("nccl weights were pushed to the connected engines during publish; "
                           "use an object_store bundle (LearnerGroup.weights(role, 'object_store')) for others")


@register
class NcclTransport(Transport):
    name = "nccl"

    def __init__(self, bucket_mb: int = 256):
        super().__init__(bucket_mb)
        self._engine = None
        self._pending: Iterable[tuple[str, torch.Tensor]] | None = None

    def connect(self, receivers: list, num_workers: int, metadata: Callable[[], list[tuple[str, torch.dtype,
                tuple[int, ...]]]], master_address: str, master_port: int) -> None:
        """Rendezvous with the receivers' vLLM workers (`num_workers` of them in all); rank 0 only."""
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        transport = self

        class _Source(WeightSource):
            def metadata(self) -> list[ParamMeta]:
                return [ParamMeta(n, d, tuple(s)) for n, d, s in metadata()]

            def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
                if transport._pending is None:
                    raise RuntimeError("nccl transport: send outside publish()")
                for name, t in transport._pending:
                    yield name, t.contiguous()

        info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port,
                                   world_size=1 + num_workers, packed=True,
                                   packed_buffer_size_bytes=self.bucket_bytes)
        self._engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=RayVLLMWeightSyncClient(list(receivers)), source=_Source())
        self._metadata = metadata

    def publish(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> NcclReceipt:
        if self._engine is None:
            raise RuntimeError("nccl transport: connect() the receivers before publishing")
        meta = self._metadata()
        t0 = time.perf_counter()
        self._pending = named
        try:
            self._engine.send_weights()
        finally:
            self._pending = None
        nbytes = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in meta)
        return NcclReceipt(version=version, nbytes=nbytes, names=[n for n, _, _ in meta],
                           publish_s=time.perf_counter() - t0)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
