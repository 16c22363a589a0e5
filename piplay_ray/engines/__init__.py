"""Generation engines behind one interface (base.py), one file per engine, named in `registry.ENGINES`.

A new engine is an `Engine` subclass in a file of its own with a `from_config` classmethod (the arguments of
:func:`make_engine`) and one line in `registry.ENGINES`; this package never imports an engine until one is
asked for, so a worker that runs transformers never imports vLLM.
"""

from __future__ import annotations

from piplay_ray.engines.base import Engine, Generation, SamplingSpec, TopK, named_tensors
from piplay_ray.registry import ENGINES

__all__ = ["Engine", "Generation", "SamplingSpec", "TopK", "make_engine", "named_tensors"]


def make_engine(kind: str, model_path: str, rollout_cfg, dtype: str = "auto", seed: int = 0,
                max_logprobs: int = 64, tensor_parallel_size: int | None = None,
                gpu_memory_utilization: float | None = None, lora=None) -> Engine:
    """Build the engine `kind` names in `registry.ENGINES` with the `rollout` config section; the teacher passes
    its own tensor-parallel size and GPU memory share. `lora` (a `learner.lora` section): serve that adapter and
    take adapter-only weight syncs where the engine can (`Engine.weight_form`)."""
    return ENGINES.load(kind).from_config(
        model_path, rollout_cfg, dtype=dtype, seed=seed, max_logprobs=max_logprobs,
        tensor_parallel_size=tensor_parallel_size or rollout_cfg.tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization or rollout_cfg.gpu_memory_utilization, lora=lora)
