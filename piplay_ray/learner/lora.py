"""LoRA on a trained role (`learner.lora`): PEFT adapters on the base model, and the two forms that leave it.

Only the adapters train and only they are in the optimizer, so a role's optimizer state is megabytes. A weight
sync to rollout engines that serve LoRA moves only the adapter (`adapter_tensors`: every A and B under PEFT's
saved names, megabytes); everything else (the teacher, whose EMA is over full weights; engines that cannot
serve LoRA; the HF export and the checkpoint's model folder) gets the merged model W + (alpha / rank)·B·A under
the base model's own parameter names. It is merged one layer at a time, so at most one merged layer exists
beside the model. The checkpoint also keeps the adapter itself in PEFT's format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from piplay_ray.config import LoraConfig

ADAPTER = "default"  # PEFT's name for the one adapter a role has
ADAPTER_DIR = "adapter"  # inside a role's checkpoint folder: adapter_model.safetensors + adapter_config.json
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

Gather = Callable[[list[torch.nn.Parameter]], contextlib.AbstractContextManager]


def wrap(model: torch.nn.Module, lc: LoraConfig) -> torch.nn.Module:
    """The model with adapters on `lc.target_modules`; PEFT freezes every base parameter."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lc.target_modules[0] if lc.target_modules == ["all-linear"] else list(lc.target_modules)
    spec = PeftLoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, spec)
    except ValueError as e:  # no module matched, or a module type PEFT cannot adapt
        raise ValueError(f"learner.lora.target_modules={lc.target_modules}: {e}") from None
    bad = [name for name, layer in lora_layers(peft_model).items() if not _is_plain_linear(layer)]
    if bad:
        raise ValueError(f"learner.lora.target_modules={lc.target_modules}: only linear layers can be merged "
                         f"for the engines, but it adapts {', '.join(bad[:3])}")
    return peft_model


def _is_plain_linear(layer) -> bool:
    from peft.tuners.lora import Linear

    return isinstance(layer, Linear) and not layer.use_dora.get(ADAPTER, False)


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Adapted layers by their module name in the PEFT model."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def hf_module(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (its config and `save_pretrained`), or `module` itself."""
    get = getattr(module, "get_base_model", None)
    return get() if callable(get) else module


def base_name(name: str) -> str:
    """A PEFT parameter name as the base model names it: `base_model.model.x.q_proj.base_layer.weight` ->
    `x.q_proj.weight`."""
    return name.removeprefix(_PREFIX).replace(".base_layer.", ".")


def adapter_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA matrices (A and B of every adapted layer), by PEFT name."""
    ids = {id(p) for layer in lora_layers(module).values()
           for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())}
    return {n: p for n, p in module.named_parameters() if id(p) in ids}


def peft_name(name: str) -> str:
    """PEFT's saved name of an adapter parameter (the adapter's own name dropped): `x.q_proj.lora_A.default.weight`
    -> `x.q_proj.lora_A.weight`, the names of `adapter_model.safetensors`, which vLLM and PEFT load."""
    return name.replace(f".{ADAPTER}.", ".")


def adapter_tensors(module: torch.nn.Module, gathered: Gather, copy: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(PEFT saved name, full tensor) of every A and B, one gathered at a time: what an adapter-only sync
    sends; `copy` as in `merged_parameters`."""
    for name, p in adapter_parameters(module).items():
        with gathered([p]):
            yield peft_name(name), p.data.detach().clone() if copy else p.data.detach()


def base_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(base model name, parameter) for every parameter that is not an adapter's."""
    adapters = set(adapter_parameters(module))
    for name, p in module.named_parameters():
        if name not in adapters:
            yield base_name(name), p


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
          fan_in_fan_out: bool = False) -> torch.Tensor:
    """W + scale·B·A in fp32, rounded once to W's dtype; `fan_in_fan_out`: W is stored [in, out] (GPT-2's
    Conv1D), so the update is transposed too."""
    w = weight.float()
    a, b = a.float(), b.float()
    merged = torch.addmm(w, a.T, b.T, alpha=scale) if fan_in_fan_out else torch.addmm(w, b, a, alpha=scale)
    return merged.to(weight.dtype)


def merged_parameters(module: torch.nn.Module, gathered: Gather, copy: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(base name, full tensor) of the merged model, one layer gathered and merged at a time; `copy`: clone
    the unadapted tensors (a ZeRO-3 gather frees them when its context ends)."""
    by_weight = {f"{n}.base_layer.weight": layer for n, layer in lora_layers(module).items()}
    adapters = set(adapter_parameters(module))
    for name, p in module.named_parameters():
        if name in adapters:
            continue
        layer = by_weight.get(name)
        if layer is None:
            with gathered([p]):
                yield base_name(name), p.data.detach().clone() if copy else p.data.detach()
            continue
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        with gathered([p, a, b]):
            merged = merge(p.data, a.data, b.data, layer.scaling[ADAPTER], layer.fan_in_fan_out)
        yield base_name(name), merged


def adapter_state(module: torch.nn.Module, gathered: Gather) -> dict[str, torch.Tensor]:
    """Full CPU copies of the adapter matrices under their PEFT names (every ZeRO-3 rank must call it)."""
    out = {}
    for name, p in adapter_parameters(module).items():
        with gathered([p]):
            out[name] = p.data.detach().to("cpu", copy=True)
    return out


def save_adapter(module: torch.nn.Module, state: dict[str, torch.Tensor], out: str | Path) -> None:
    """The adapter in PEFT's format (adapter_model.safetensors + adapter_config.json): `PeftModel.from_pretrained`
    over the base model loads it."""
    module.save_pretrained(str(out), state_dict=state, safe_serialization=True)


def check_checkpoint(role_dir: str | Path, on: bool) -> None:
    """A LoRA run resumes only a LoRA checkpoint and a full run only a full one: DeepSpeed's state of one
    does not fit the other's parameters."""
    has = (Path(role_dir) / ADAPTER_DIR).is_dir()
    if has != on:
        raise ValueError(f"{role_dir} was written {'with' if has else 'without'} learner.lora, but this run has "
                         f"learner.lora.rank={'0' if not on else '> 0'}; resume it with the setting it was written "
                         "with (or start a new run directory)")
