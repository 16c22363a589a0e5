"""LoRA adapters on the engine side: what an adapter-only weight sync delivers, and its files.

An engine started with `lora` (the run's `learner.lora`) serves the base model plus one adapter, and each
sync replaces the adapter: the learner sends every LoRA matrix under PEFT's saved names
(`base_model.model.<module>.lora_A.weight`, `... .lora_B.weight`). Rank and targets follow from the tensors;
alpha is the run's. `zero_adapter` is the version-0 adapter (B = 0, so the engine serves the base model) an
engine loads at start-up, which is also its check that it can serve this adapter at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from piplay_ray.config import LoraConfig

PREFIX = "base_model.model."
MATRICES = (".lora_A.weight", ".lora_B.weight")
WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


def module_of(name: str) -> str | None:
    """The adapted module's path in the base model (`model.layers.0.self_attn.q_proj`), or None for a name
    that is not an adapter matrix."""
    if not name.startswith(PREFIX):
        return None
    for suffix in MATRICES:
        if name.endswith(suffix):
            return name[len(PREFIX): -len(suffix)]
    return None


def check(tensors: dict[str, torch.Tensor], lc: LoraConfig) -> list[str]:
    """The adapted modules, after checking that every tensor is an A or B of rank `lc.rank` and pairs up."""
    modules: dict[str, set[str]] = {}
    for name, t in tensors.items():
        module = module_of(name)
        if module is None:
            raise KeyError(f"adapter sync: {name!r} is not a LoRA matrix (engines serving LoRA take only adapters)")
        rank = t.shape[0] if name.endswith(MATRICES[0]) else t.shape[-1]
        if t.dim() != 2 or rank != lc.rank:
            raise ValueError(f"adapter sync: {name} has shape {tuple(t.shape)}, not rank {lc.rank} "
                             "(learner.lora.rank)")
        modules.setdefault(module, set()).add(name[-len(MATRICES[0]):])
    odd = [m for m, got in modules.items() if len(got) != 2]
    if odd or not modules:
        raise ValueError(f"adapter sync: modules without both A and B: {odd[:3]}" if odd else "adapter sync: empty")
    return sorted(modules)


def write(folder: str | Path, tensors: dict[str, torch.Tensor], lc: LoraConfig) -> Path:
    """The adapter as PEFT saves it (adapter_model.safetensors + adapter_config.json), which vLLM loads."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    modules = check(tensors, lc)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, str(folder / WEIGHTS_FILE))
    spec = PeftLoraConfig(r=lc.rank, lora_alpha=lc.alpha, target_modules=modules, bias="none", task_type="CAUSAL_LM")
    spec.save_pretrained(str(folder))  # adapter_config.json
    return folder


def zero_adapter(model_path: str, lc: LoraConfig) -> dict[str, torch.Tensor]:
    """The adapter of `lc` on this model with every matrix zero (built on the meta device: no weights load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from piplay_ray.learner import lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    shapes = {lora.peft_name(n): p.shape for n, p in lora.adapter_parameters(lora.wrap(model, lc)).items()}
    return {n: torch.zeros(s) for n, s in shapes.items()}


def as_dict(weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Copies of the pairs (the transport's views are only valid until the next bucket)."""
    return {n: t.detach().to("cpu", copy=True) for n, t in weights}
