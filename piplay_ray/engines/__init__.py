"""Generation engines behind one small interface (see base.py); one file per engine."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from piplay_ray.engines.base import Engine, Generation, SamplingSpec, TopK

__all__ = ["Engine", "Generation", "SamplingSpec", "TopK", "make_engine", "named_tensors"]


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


def make_engine(kind: str, model_path: str, rollout_cfg, dtype: str = "auto", seed: int = 0,
                max_logprobs: int = 64, tensor_parallel_size: int | None = None,
                gpu_memory_utilization: float | None = None, lora=None) -> Engine:
    """Build the engine named by `kind` ("vllm" or "transformers") with the `rollout` config section;
    the teacher passes its own tensor-parallel size and GPU memory share. `lora` (a `learner.lora` section):
    serve that adapter and take adapter-only weight syncs where the engine can (`Engine.weight_form`)."""
    if kind == "vllm":
        from piplay_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, dtype=dtype, seed=seed, max_model_len=rollout_cfg.max_model_len,
                          max_num_seqs=rollout_cfg.max_num_seqs,
                          gpu_memory_utilization=gpu_memory_utilization or rollout_cfg.gpu_memory_utilization,
                          kv_cache_gib=rollout_cfg.kv_cache_gib,
                          tensor_parallel_size=tensor_parallel_size or rollout_cfg.tensor_parallel_size,
                          enforce_eager=rollout_cfg.enforce_eager, max_logprobs=max_logprobs, lora=lora)
    if kind == "transformers":
        from piplay_ray.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_path, dtype=dtype, seed=seed, lora=lora)
    raise ValueError(f"unknown engine {kind!r}; allowed: vllm, transformers")
