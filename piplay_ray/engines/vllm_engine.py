"""The vLLM engine: continuous batching of many agent turns at once, token ids in, token ids out.

vLLM's `AsyncLLM` runs on its own event loop in a background thread, so the engine serves coroutines from
any loop (a Ray async actor, a test, a script) and many trajectories share one batch while others wait on
search. A weight update waits until no request runs, has every worker process load the new weights
(vllm_weights.py: from a collective broadcast, or from a file in shared memory for the object store), then
resets the prefix cache so that no KV computed with old weights is reused.

With `lora` it serves LoRA and a sync moves only the adapter (vllm_lora.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterable

import torch

from piplay_ray.engines import adapter
from piplay_ray.engines.base import Engine, Generation, SamplingSpec, TopK, named_tensors
from piplay_ray.engines.vllm_lora import LoraServing
from piplay_ray.engines.vllm_swap import WeightSwap
from piplay_ray.engines.vllm_weights import WeightLoader, sweep_orphans, write_shared

GiB = 1 << 30
STREAM_BUCKET_MB, STREAM_TIMEOUT_S = 256, 600.0  # astream_weights: its buckets and a stalled worker's deadline


class VLLMEngine(LoraServing, WeightSwap, Engine):
    @classmethod
    def from_config(cls, model_path: str, rollout_cfg, *, dtype: str, seed: int, max_logprobs: int,
                    tensor_parallel_size: int, gpu_memory_utilization: float, lora=None) -> VLLMEngine:
        return cls(model_path, dtype=dtype, seed=seed, max_model_len=rollout_cfg.max_model_len,
                   max_num_seqs=rollout_cfg.max_num_seqs, gpu_memory_utilization=gpu_memory_utilization,
                   kv_cache_gib=rollout_cfg.kv_cache_gib, tensor_parallel_size=tensor_parallel_size,
                   enforce_eager=rollout_cfg.enforce_eager, max_logprobs=max_logprobs, lora=lora,
                   sleep=rollout_cfg.sleep_when_idle, inflight=rollout_cfg.inflight_updates,
                   kv=rollout_cfg.inflight_kv)

    def __init__(self, model_path: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int = 4096,
                 max_num_seqs: int = 64, gpu_memory_utilization: float = 0.85, kv_cache_gib: float = 1.0,
                 tensor_parallel_size: int = 1, enforce_eager: bool = True, max_logprobs: int = 64,
                 lora=None, sleep: bool = False, inflight: bool = False, kv: str = "recompute"):
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform

        sweep_orphans()  # what engines killed mid-sync left in this host's shared memory
        on_cpu = current_platform.is_cpu()
        self.can_sleep = sleep and current_platform.is_sleep_mode_available()  # CUDA, ROCm, XPU
        args = dict(
            model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager, max_logprobs=max_logprobs,
            enable_prefix_caching=True, disable_log_stats=True, scheduling_policy="priority",  # ties: FCFS
            worker_extension_cls=f"{WeightLoader.__module__}.{WeightLoader.__qualname__}",
            **({"kv_cache_memory_bytes": int(kv_cache_gib * GiB)} if on_cpu
               else {"gpu_memory_utilization": gpu_memory_utilization}),
            **({"enable_sleep_mode": True} if self.can_sleep else {}),
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        self.group_ranks = tensor_parallel_size
        self._streams = 0  # astream_weights' private groups so far (each a new generation)
        self._inflight = 0
        self._ready: asyncio.Event | None = None
        self._idle: asyncio.Condition | None = None
        self._waking: asyncio.Lock | None = None
        self._asleep = False
        self.inflight, self.recompute = inflight, kv == "recompute"
        self.llm = None
        if lora is not None:
            try:
                self._start_lora(model_path, lora, args)
                return
            except Exception as e:  # this build or model cannot serve the adapter: full weights instead
                self.lora_note = f"vLLM cannot serve LoRA here ({type(e).__name__}: {str(e)[:200]})"
                self._stop_llm()
                self._lora = None
        self.llm = self._call(self._start(AsyncEngineArgs(**args)))

    async def _start(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        self._ready, self._idle, self._waking = asyncio.Event(), asyncio.Condition(), asyncio.Lock()
        self._ready.set()
        return AsyncLLM.from_engine_args(args)

    def _call(self, coro):
        """Run a coroutine on the engine loop and wait for it (from synchronous code)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _on_engine(self, coro):
        """Await a coroutine that runs on the engine loop, from whatever loop the caller is on."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    # ------------------------------------------------------------------------------------- requests

    async def _request(self, prompt_ids: list[int], params, lora_request=None, on_output=None, priority: int = 0):
        """One request, with the policy's adapter unless `lora_request` names another (the teacher's);
        `on_output(out)` sees every output as it comes (streamed with `RequestOutputKind.DELTA`)."""
        from vllm.inputs import TokensPrompt

        await self._ready.wait()  # closed while weights are being replaced between requests
        self._inflight += 1
        try:
            await self._awake()
            final = None
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                               request_id=uuid.uuid4().hex, priority=priority,
                                               lora_request=lora_request or self._lora_request):
                final = out
                if on_output is not None:
                    on_output(out)
            return final
        finally:
            self._inflight -= 1
            async with self._idle:
                self._idle.notify_all()

    async def generate(self, prompt_ids: list[int], spec: SamplingSpec) -> Generation:
        """Each token takes the version the engine holds when it arrives. With in-flight updates the tokens
        stream in (DELTA): a swap sets the new version while generation is paused, after the tokens made
        before the pause came out (vllm_swap.py); without, a swap waits for no request to run, so the
        request's one version is the one at its end."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.DELTA if self.inflight else RequestOutputKind.FINAL_ONLY
        params = SamplingParams(max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
                                stop=list(spec.stop), include_stop_str_in_output=True, logprobs=0,
                                seed=spec.seed, output_kind=kind)
        ids, logprobs, versions = [], [], []

        def take(out) -> None:
            o = out.outputs[0]
            ids.extend(o.token_ids)
            logprobs.extend(float(lp[t].logprob) for lp, t in zip(o.logprobs, o.token_ids, strict=True))
            versions.extend([self.version] * len(o.token_ids))

        request = self._request(prompt_ids, params, on_output=take, priority=spec.priority)
        out = (await self._on_engine(request)).outputs[0]
        if out.finish_reason == "length":
            finish = "length"
        elif out.finish_reason == "stop" and isinstance(out.stop_reason, str):
            finish = "stop"
        elif out.finish_reason == "stop":
            finish = "eos"  # the EOS token (stop_reason None) or a stop token id
        else:
            raise RuntimeError(f"vLLM request ended with {out.finish_reason!r}")
        return Generation(ids, logprobs, finish, versions)

    async def prompt_topk(self, token_ids: list[int], start: int, k: int) -> TopK:
        return await self._topk(token_ids, start, k)

    async def _topk(self, token_ids: list[int], start: int, k: int, lora_request=None) -> TopK:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not 1 <= start <= len(token_ids):
            raise ValueError(f"start must be in [1, {len(token_ids)}], got {start}")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        out = await self._on_engine(self._request(token_ids, params, lora_request))
        ids, lps = [], []
        for dist in out.prompt_logprobs[start:]:
            # the dict holds the top k plus the actual next token when it ranks below k
            best = sorted(dist.items(), key=lambda kv: kv[1].rank)[:k]
            ids.append([t for t, _ in best])
            lps.append([float(lp.logprob) for _, lp in best])
        return TopK(ids=ids, logprobs=lps)

    # ------------------------------------------------------------------------------------- weights

    async def areceive_weights(self, ticket: dict) -> int:
        if self._lora is not None:
            self._settle(await self._receive_adapter(ticket))
        else:
            await self._on_engine(self._swap_rpc("piplay_receive", dict(ticket), self._settle))
        return self.version

    def _settle(self, out: list) -> None:
        """Take the version every worker says it received."""
        versions = {v for v, _ in out}
        if len(versions) != 1:
            raise RuntimeError(f"vLLM workers received different weight versions: {sorted(versions)}")
        self.version = versions.pop()

    def update_weights(self, version: int, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self._lora is not None:
            self._call(self._swap_adapter(self._write_adapter(adapter.as_dict(named_tensors(weights)))))
            self.version = version
            return
        path = write_shared(named_tensors(weights))
        try:
            self._call(self._swap(path, version))
        finally:
            os.unlink(path)

    async def aupdate_weights(self, version: int, weights) -> None:
        """`update_weights` for callers on an event loop (the file is written in a thread)."""

        if self._lora is not None:
            folder = await asyncio.to_thread(lambda: self._write_adapter(adapter.as_dict(named_tensors(weights))))
            await self._on_engine(self._swap_adapter(folder))
            self.version = version
            return
        path = await asyncio.to_thread(write_shared, named_tensors(weights))
        try:
            await self._on_engine(self._swap(path, version))
        finally:
            os.unlink(path)

    async def astream_weights(self, version: int, weights) -> None:
        """Full weights from this process into the engine's workers without a file: a private group of this
        process (rank 0) and the workers, which share its device, so the `ipc` transport (CUDA IPC; shared
        memory on CPU): at most the sender's two bucket buffers exist beside the weights (the teacher's load
        of its EMA)."""
        import torch

        from piplay_ray.weight_sync.ipc import IpcTransport

        self._streams += 1
        tx = IpcTransport(STREAM_BUCKET_MB, device="cuda" if torch.cuda.is_available() else "cpu")
        rdv = tx.open("127.0.0.1", 1 + self.group_ranks, self._streams, STREAM_TIMEOUT_S)
        try:
            await asyncio.gather(asyncio.to_thread(tx.publish, version, named_tensors(weights)),
                                 self.areceive_weights(rdv.ticket(1, version)))
        finally:
            tx.member.leave()

    def _stop_llm(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.shutdown()
            self.llm = None
        self._lora_request = self._teacher_request = None

    def shutdown(self) -> None:
        self._stop_llm()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
