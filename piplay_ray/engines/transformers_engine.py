"""The transformers engine: the fallback rollout engine and the reference the vLLM engine is tested against.

One model; a lock serialises the forward passes, which run in a thread so the event loop keeps serving search
calls. A request holds the lock for its whole generation, unless `inflight` (rollout.inflight_updates): then
it takes it per decoding step, so a weight update lands between two tokens of running requests, which go on
with the new weights (their KV cache recomputed, or kept with `kv="keep"`) and tag every token with the
version that produced it. Logprobs are the model's raw log-softmax, like vLLM's `raw_logprobs`.
With `lora` the model carries a PEFT adapter of that config (zero at start: the base model) and a weight sync
copies new A and B matrices into it in place (`weight_form` "adapter"). Under `teacher.backend: shared` it
also holds a second adapter, the teacher's EMA (`aload_teacher`), switched in for `teacher_topk` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable

import torch

from piplay_ray.config import LoraConfig
from piplay_ray.engines import adapter
from piplay_ray.engines.base import Engine, Generation, SamplingSpec, TopK, named_tensors
from piplay_ray.learner import lora as peft_lora
from piplay_ray.weight_sync import receiver_for

TEACHER = "teacher"  # PEFT's name for the teacher's adapter beside the policy's
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class TransformersEngine(Engine):
    @classmethod
    def from_config(cls, model_path: str, rollout_cfg, *, dtype: str, seed: int, lora=None,
                    **_: object) -> TransformersEngine:
        """One process on one device: tensor parallelism, memory shares and logprob caps do not apply."""
        return cls(model_path, dtype=dtype, seed=seed, lora=lora,
                   inflight=rollout_cfg.inflight_updates, kv=rollout_cfg.inflight_kv)

    def __init__(self, model_path: str, dtype: str = "auto", seed: int = 0, device: str | None = None,
                 num_threads: int | None = None, lora: LoraConfig | None = None, inflight: bool = False,
                 kv: str = "recompute"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES.get(dtype, "auto"))
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos) | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        self.seed = seed
        self._adapter: dict[str, torch.nn.Parameter] | None = None
        self._teacher: dict[str, torch.nn.Parameter] | None = None
        if lora is not None:
            self._wrap(lora)
        self._lock = threading.Lock()
        self._calls = 0
        self.inflight, self.recompute = inflight, kv == "recompute"

    # ------------------------------------------------------------------------------------- generate

    @torch.inference_mode()
    def generate_sync(self, prompt_ids: list[int], spec: SamplingSpec) -> Generation:
        whole = contextlib.nullcontext() if self.inflight else self._lock  # else: the lock per step
        step = self._lock if self.inflight else contextlib.nullcontext()
        with whole:
            self._calls += 1
            generator = torch.Generator(device=self.device)
            generator.manual_seed(spec.seed if spec.seed is not None else self.seed * 1_000_003 + self._calls)
            past, seen, out_ids, logprobs, versions, finish = None, None, [], [], [], "length"
            for _ in range(spec.max_tokens):
                with step:
                    if past is not None and seen != self.version and self.recompute:
                        past = None  # new weights: the whole context again, under them
                    new = (prompt_ids + out_ids) if past is None else out_ids[-1:]
                    out = self.model(input_ids=torch.tensor([new], device=self.device), past_key_values=past,
                                     use_cache=True)
                    past, seen = out.past_key_values, self.version
                logits = out.logits[0, -1].float()
                tok = sample_token(logits, spec.temperature, spec.top_p, generator)
                out_ids.append(tok)
                logprobs.append(float(torch.log_softmax(logits, -1)[tok]))
                versions.append(seen)
                if tok in self.eos_ids:
                    finish = "eos"
                    break
                if spec.stop and any(s in self.tokenizer.decode(out_ids[-32:]) for s in spec.stop):
                    finish = "stop"
                    break
            return Generation(out_ids, logprobs, finish, versions)

    async def generate(self, prompt_ids: list[int], spec: SamplingSpec) -> Generation:
        return await asyncio.to_thread(self.generate_sync, list(prompt_ids), spec)

    # ------------------------------------------------------------------------------------- scoring

    @torch.inference_mode()
    def logprobs_of(self, token_ids: list[int], start: int, teacher: bool = False) -> torch.Tensor:
        """Full next-token log-distributions predicting token_ids[start:] (rows = positions); `teacher`: with
        the teacher's adapter in place of the policy's."""
        if not 1 <= start <= len(token_ids):
            raise ValueError(f"start must be in [1, {len(token_ids)}], got {start}")
        if teacher and self._teacher is None:
            raise RuntimeError("teacher_topk: no teacher adapter loaded (aload_teacher)")
        with self._lock:
            ids = torch.tensor([token_ids], device=self.device)
            if teacher:
                self.model.set_adapter(TEACHER)
            try:
                logits = self.model(input_ids=ids).logits[0, start - 1 : len(token_ids) - 1].float()
            finally:
                if teacher:
                    self.model.set_adapter(peft_lora.ADAPTER)
        return torch.log_softmax(logits, -1).cpu()

    def prompt_topk_sync(self, token_ids: list[int], start: int, k: int, teacher: bool = False) -> TopK:
        values, ids = torch.topk(self.logprobs_of(token_ids, start, teacher), k, dim=-1)
        return TopK(ids=ids.tolist(), logprobs=values.tolist())

    async def prompt_topk(self, token_ids: list[int], start: int, k: int) -> TopK:
        return await asyncio.to_thread(self.prompt_topk_sync, list(token_ids), start, k)

    async def teacher_topk(self, token_ids: list[int], start: int, k: int) -> TopK:
        return await asyncio.to_thread(self.prompt_topk_sync, list(token_ids), start, k, True)

    # ------------------------------------------------------------------------------------- weights

    def _wrap(self, lc: LoraConfig) -> None:
        """Serve `lc`'s adapter (zero B: the base model) on the model, or the base alone if PEFT cannot."""
        try:
            self.model = peft_lora.wrap(self.model, lc).eval().requires_grad_(False)
        except (ImportError, ValueError) as e:
            self.lora_note = f"transformers engine cannot serve LoRA ({e})"
            return
        self._lora, self.weight_form = lc, "adapter"
        self._adapter = {peft_lora.peft_name(n): p for n, p in peft_lora.adapter_parameters(self.model).items()}

    @torch.inference_mode()
    def update_weights(self, version: int | Callable[[], int], weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load `weights` and take `version` (or what `version()` says once they are loaded: a sync's receiver
        learns it from the wire) under one lock: no token sees the new weights under the old version."""
        if self._adapter is not None:
            return self._load_adapter(version, weights)
        state = self.model.state_dict()
        with self._lock:
            for name, tensor in named_tensors(weights):
                if name not in state:
                    raise KeyError(f"update_weights: {name!r} is not a parameter of the model")
                if state[name].shape != tensor.shape:
                    raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(state[name].shape)}")
                state[name].copy_(tensor)
            self.version = version() if callable(version) else version

    def _load_adapter(self, version: int | Callable[[], int], weights) -> None:
        """Copy a whole adapter (every A and B, PEFT saved names) into the model's adapter."""
        self._copy_adapter(self._adapter, weights, then=lambda: setattr(
            self, "version", version() if callable(version) else version))

    @torch.inference_mode()
    def _copy_adapter(self, into: dict[str, torch.nn.Parameter], weights, then=lambda: None) -> None:
        new = adapter.as_dict(named_tensors(weights))  # a transport's views last only until its next bucket
        adapter.check(new, self._lora)
        if set(new) != set(into):
            missing, extra = sorted(set(into) - set(new)), sorted(set(new) - set(into))
            raise KeyError(f"adapter sync: missing {missing[:3]}, unknown {extra[:3]} (learner.lora.target_modules "
                           "must match the engine's)")
        with self._lock:
            for name, tensor in new.items():
                into[name].copy_(tensor)
            then()

    def load_teacher(self, version: int, weights) -> None:
        """The teacher's adapter (same rank and targets as the policy's), added as a second PEFT adapter on
        first use; the policy's stays the active one."""
        if self._adapter is None:
            raise RuntimeError("a teacher adapter needs an engine serving LoRA (learner.lora)"
                               + (f": {self.lora_note}" if self.lora_note else ""))
        if self._teacher is None:
            with self._lock:
                self.model.add_adapter(TEACHER, self.model.peft_config[peft_lora.ADAPTER])
                self.model.requires_grad_(False)
            self._teacher = {n.replace(f".{TEACHER}.", "."): p for n, p in self.model.named_parameters()
                             if f".{TEACHER}." in n}
        self._copy_adapter(self._teacher, weights)
        self.teacher_version = version

    async def aload_teacher(self, version: int, weights) -> None:
        await asyncio.to_thread(self.load_teacher, version, weights)

    async def aupdate_weights(self, version: int, weights) -> None:
        """`update_weights` for callers on an event loop."""
        await asyncio.to_thread(self.update_weights, version, weights)

    def receive_weights(self, ticket: dict) -> int:
        """Join the role's group (once per generation) and copy the broadcast straight into the parameters."""

        rx = self._receiver = receiver_for(ticket, self.device, getattr(self, "_receiver", None))
        self.update_weights(lambda: rx.version, rx.receive(ticket))
        return rx.version

    async def areceive_weights(self, ticket: dict) -> int:
        return await asyncio.to_thread(self.receive_weights, ticket)
