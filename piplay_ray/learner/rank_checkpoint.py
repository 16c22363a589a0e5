"""A learner rank's part of a checkpoint (the layout is in `checkpoint`).

Per trained role: rank 0 writes the Hugging Face folder (with LoRA, also the adapter in PEFT format) and
every rank its share of the DeepSpeed training state (optimizer shards, scheduler), with the role's version
and the groups it trained; then each rank's RNG state. Loading restores all of it. `worker` is the rank's
`rank.LearnerWorkerImpl` (not imported: rank.py imports this module).
"""

from __future__ import annotations

from pathlib import Path

import torch

from piplay_ray.learner import checkpoint, lora


def save(worker, path: Path) -> None:
    """Write this rank's part of a checkpoint into `path` (the group renames it when all are done)."""
    for role, pol in worker.policies.items():
        with worker.resident(role):
            sd = worker.state_dict(role)
            if worker.rank == 0:
                checkpoint.save_hf(lora.hf_module(pol.engine.module), pol.tokenizer, sd, path / role)
            if pol.lora:
                adapter = worker.adapter_state(role)
                if worker.rank == 0:
                    lora.save_adapter(pol.engine.module, adapter, path / role / lora.ADAPTER_DIR)
            # with LoRA the frozen base is the model path's own weights: only the adapter is state
            pol.engine.save_checkpoint(str(path / role / "train_state"), tag="state", save_latest=False,
                                       client_state={"version": pol.version, "trained": pol.trained},
                                       exclude_frozen_parameters=pol.lora)
    (path / "rng").mkdir(exist_ok=True)
    torch.save(checkpoint.rng_state(), path / "rng" / f"rank-{worker.rank}.pt")
    torch.distributed.barrier()


def load(worker, path: Path) -> dict[str, int]:
    """Restore what `save` wrote: each role's training state and version, and this rank's RNG."""
    for role, pol in worker.policies.items():
        if not (path / role / "train_state").is_dir():
            raise FileNotFoundError(f"{path}: no training state for role {role!r}")
        lora.check_checkpoint(path / role, pol.lora)
        with worker.resident(role):  # DeepSpeed loads into resident buffers only
            _, client = pol.engine.load_checkpoint(str(path / role / "train_state"), tag="state",
                                                   load_module_strict=not pol.lora,  # no frozen base
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load the {role} state")
        pol.version, pol.trained = int(client["version"]), list(client.get("trained", []))
    rng = path / "rng" / f"rank-{worker.rank}.pt"
    if rng.is_file():
        checkpoint.set_rng_state(torch.load(rng, weights_only=False))
    return {role: pol.version for role, pol in worker.policies.items()}
