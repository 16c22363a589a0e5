"""The engine interface shared by rollout workers and the teacher.

An engine owns one copy of a policy's weights and answers three questions: continue these tokens
(`generate`), what are the top-K next-token logprobs at these positions of a fixed sequence
(`prompt_topk`, the teacher's scoring call), and take these new weights (`update_weights`, or
`aupdate_weights` from an event loop; `areceive_weights` in a collective sync). `shutdown` frees it.
Everything is token ids in, token ids out: no engine ever re-tokenises text it produced.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # generation stops after any of these strings (included in the output)
    seed: int | None = None
    # lower first, where an engine orders its waiting requests (vLLM): in flight the rounds of consecutive
    # learner steps share the engines, and the older step's turns go first, since the learner needs it next
    priority: int = 0


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # sampling logprob of each generated token
    finish_reason: str  # "stop" (a stop string), "eos", or "length"
    # the policy version that produced each token: weights may change mid-request (rollout.inflight_updates);
    # None: all of them the engine's version when the request started
    versions: list[int] | None = None


@dataclass
class TopK:
    """Top-K next-token distribution at each scored position: ids[i], logprobs[i] have K entries."""

    ids: list[list[int]]
    logprobs: list[list[float]]


class Engine(abc.ABC):
    version: int = 0
    group_ranks: int = 1  # ranks this engine takes in its role's weight-sync group (one per worker process)
    # what a weight sync must send: "full" (every parameter, under Hugging Face names) or "adapter" (started
    # with `lora`: only the LoRA matrices, loaded in place; see engines/adapter.py)
    weight_form: str = "full"
    lora_note: str | None = None  # why an engine started with `lora` serves full weights instead
    teacher_version: int | None = None  # the teacher adapter it holds (teacher.backend: shared), None: none

    @abc.abstractmethod
    async def generate(self, prompt_ids: list[int], spec: SamplingSpec) -> Generation: ...

    @abc.abstractmethod
    async def prompt_topk(self, token_ids: list[int], start: int, k: int) -> TopK:
        """Distributions predicting token_ids[start:], i.e. from the forward at positions start-1 .. end-2."""

    @abc.abstractmethod
    def update_weights(self, version: int, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (Hugging Face parameter names); never reuse a prefix cached before."""

    async def aupdate_weights(self, version: int, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """`update_weights` for callers on an event loop; an engine whose load blocks overrides it."""
        self.update_weights(version, weights)

    async def teacher_topk(self, token_ids: list[int], start: int, k: int) -> TopK:
        """`prompt_topk` with the teacher's adapter in place of the policy's (teacher.backend: shared)."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve a teacher adapter")

    async def aload_teacher(self, version: int, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hold `weights` (every A and B of an adapter, PEFT saved names) as the teacher's adapter of `version`,
        beside the policy's own (an engine started with `lora`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve a teacher adapter")

    async def areceive_weights(self, ticket: dict) -> int:
        """Take part in a collective weight sync (weight_sync/collective.py) and load what arrives in place;
        returns the version received."""
        raise NotImplementedError(f"{type(self).__name__} cannot receive a collective weight sync")

    async def asleep(self) -> None:  # noqa: B027  (an engine that cannot sleep keeps its memory)
        """Free the device memory this engine holds while a phase does not use it; the next request or
        weight load wakes it (`rollout.sleep_when_idle`)."""

    def shutdown(self) -> None:  # noqa: B027  (an engine with nothing to free keeps this)
        """Free what the engine holds (engine processes, accelerator memory); it serves nothing after."""


def named_tensors(weights: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from an iterable of pairs, a dict, or a bundle with `named_tensors()`."""
    if hasattr(weights, "named_tensors"):
        weights = weights.named_tensors()
    elif isinstance(weights, dict):
        weights = weights.items()
    if not isinstance(weights, Iterable):
        raise TypeError(f"weights must be (name, tensor) pairs or a bundle with named_tensors(), got {type(weights)}")
    for item in weights:
        name, tensor = item
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, not a tensor")
        yield name, tensor
