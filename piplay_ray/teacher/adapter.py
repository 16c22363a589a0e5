"""The EMA teacher under `learner.lora`: an EMA of the student's adapter over the frozen base.

With LoRA the student is W + (alpha/r)·B·A with W frozen, so the teacher keeps W once (the model it was
started with) and follows only the adapter: after each student step it receives the student's A and B
matrices (megabytes, not the merged model) and blends them, ema <- (1 - tau)·ema + tau·new on each A and each
B (float32 masters, `teacher.blend_`). This is the EMA **in adapter space**: the teacher's update is
(alpha/r)·EMA(B)·EMA(A), which is not the EMA of the products B·A (an average of products is not the product
of averages; the two agree while A holds still). It is what lets the teacher be served as a second adapter
(`teacher.backend: shared`), and it is what a checkpoint saves and a resume restores: the EMA adapter, exactly.

The EMA adapter starts at zero (B = 0: the base model, which is the student's initial function too); the
student policy loads it with the student's own adapter before the first student step
(`StudentPolicy.start_phase`), so the EMA starts where the student starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from piplay_ray.config import LoraConfig
from piplay_ray.engines import adapter


def initial(model_path: str, lc: LoraConfig) -> dict[str, torch.Tensor]:
    """The zero EMA adapter of `lc` on the model (float32 masters under PEFT's saved names)."""
    return {n: t.float() for n, t in adapter.zero_adapter(model_path, lc).items()}


def served(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter matrices of a PEFT-wrapped model by PEFT saved name: where the EMA adapter is copied."""
    from piplay_ray.learner import lora

    return {lora.peft_name(n): p for n, p in lora.adapter_parameters(model).items()}


def merged(base: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], lc: LoraConfig,
           dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Base weights with the EMA adapter merged in, W + (alpha/r)·B·A, in `dtype`, for an engine that cannot
    serve LoRA (the base model's names, one layer at a time)."""
    from piplay_ray.learner.lora import merge

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in adapter.check(ema, lc):
        pre = f"{adapter.PREFIX}{module}"
        pairs[f"{module}.weight"] = (ema[pre + adapter.MATRICES[0]], ema[pre + adapter.MATRICES[1]])
    for name, w in base.items():
        ab = pairs.get(name)
        yield name, (w if ab is None else merge(w, ab[0], ab[1], lc.alpha / lc.rank)).to(dtype)
