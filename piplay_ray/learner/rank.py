"""One learner rank: its trained roles (`role_engine.RoleEngine` each), its steps, weights and checkpoints.

A plain class with no Ray at import: `learner.LearnerGroup` runs one per data-parallel rank as a Ray actor,
and bench/gpu_learner.py drives one directly on a GPU machine where Ray is not installed. The examiner and
the student share the rank's device and alternate by phase; with `offload_inactive` the idle role's states
move to host memory. One optimizer step over the global batch is `step.train_step`. A rank takes only what it
reads of the config (`rank_args`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from piplay_ray import assets
from piplay_ray.config import Config, LearnerConfig, WeightSyncConfig
from piplay_ray.learner import checkpoint, lora, offload, rank_checkpoint, step
from piplay_ray.learner.rank_env import pin_threads, rank_env, unlink_shm_buffers
from piplay_ray.learner.role_engine import RoleEngine
from piplay_ray.records import Experience
from piplay_ray.weight_sync import make_transport


def rank_args(cfg: Config, roles: Sequence[str]) -> dict:
    """What a rank reads of the whole config `cfg` (each role's model path, the `learner` and `weight_sync`
    sections, the seed) as its constructor's keyword arguments, JSON-able for the trip across Ray."""
    return {"models": {role: cfg.model.path_for(role) for role in roles}, "seed": cfg.run.seed,
            "learner": cfg.learner.model_dump(mode="json"), "weight_sync": cfg.weight_sync.model_dump(mode="json")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerWorkerImpl:
    """One data-parallel rank (plain class; `LearnerWorker` is its actor)."""

    def __init__(self, rank: int, world_size: int, *, models: Mapping[str, str], learner: dict | LearnerConfig,
                 weight_sync: dict | WeightSyncConfig, seed: int):
        """`models`: each trained role's model path (a name `assets.resolve_model` knows), in role order."""
        self.learner = LearnerConfig.model_validate(learner)
        self.weight_sync = WeightSyncConfig.model_validate(weight_sync)
        self.models, self.seed = dict(models), seed
        self.roles, self.rank, self.world_size = tuple(self.models), rank, world_size
        self.policies: dict[str, RoleEngine] = {}
        self.transports: dict[tuple[str, str], object] = {}
        self.active: str | None = None

    def node_info(self) -> tuple[str, int, list]:
        import ray  # here and in open_sync_group only: the rank runs without Ray in bench/gpu_learner.py

        return ray.util.get_node_ip_address(), _free_port(), ray.get_gpu_ids()

    def setup(self, master_addr: str, master_port: int, local_rank: int, local_size: int,
              gpu_ids: Sequence[str | int]) -> dict:
        """Join the ranks' process group and build the policies; `gpu_ids`: what Ray gave this rank."""
        env, cuda_index = rank_env(self.rank, self.world_size, local_rank, local_size, master_addr, master_port,
                                   gpu_ids, os.environ)
        os.environ.update(env)
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if torch.cuda.is_available() and cuda_index is not None:
            torch.cuda.set_device(cuda_index)
        if self.learner.cpu_cores:
            pin_threads(self.learner.cpu_cores)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, init_method=f"tcp://{master_addr}:{master_port}",
                                   rank=self.rank, world_size=self.world_size)
        # DeepSpeed's CPU all-reduce maps every rank's /dev/shm buffer during init; once all ranks are past
        # it the names can go (the mappings stay valid), so a crash cannot leak RAM-backed files.
        torch.distributed.barrier()
        self.close()
        self.device = torch.device(get_accelerator().current_device_name())
        torch.manual_seed(self.seed)
        for role in self.roles:
            path = assets.resolve_model(self.models[role])
            self.policies[role] = RoleEngine(role, path, self.learner, self.world_size, self.device)
        self.activate(self.roles[0])
        first = self.policies[self.roles[0]]
        return {"rank": self.rank, "device": str(self.device), "bf16": first.bf16,
                "zero_stage": first.engine.zero_optimization_stage(),  # what runs (role_engine.zero_stage)
                "load_rss": {role: pol.load_rss.bytes for role, pol in self.policies.items()}}

    # ------------------------------------------------------------------------------------------ phases

    def close(self) -> None:
        """Unlink DeepSpeed's CPU all-reduce buffers in /dev/shm (RAM): DeepSpeed never deletes them."""
        unlink_shm_buffers(os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))

    def activate(self, role: str) -> None:
        """Make `role` resident on the device; with offload_inactive, the other roles go to host memory."""
        self._policy(role)
        self.active = role
        if not self.learner.offload_inactive:
            return
        for name, pol in self.policies.items():
            if name != role:
                pol.offload(self._pin)
            else:
                pol.reload()

    @property
    def _pin(self) -> bool:
        """Offloaded states go to page-locked host memory on a GPU."""
        return self.device.type == "cuda"

    def resident(self, role: str) -> contextlib.AbstractContextManager[RoleEngine]:
        """The role's states on the device for one save or load; an idle role goes back after. A gather
        needs none of them: the weights' partitions never leave (`offload.include`)."""
        return self._policy(role).resident(self._pin)

    def _policy(self, role: str) -> RoleEngine:
        if role not in self.policies:
            raise ValueError(f"role {role!r} is not trained by this learner (roles: {', '.join(self.policies)})")
        return self.policies[role]

    # ------------------------------------------------------------------------------------------ step

    def train_step(self, role: str, experiences: list[Experience], lam: float = 0.0,
                   objective: str = "rl", restart_optimizer: bool = False) -> dict[str, float]:
        """One optimizer step (after a fresh optimizer if asked); `objective` "rl" (the π-Play loss) or "sft"
        (the warm start's NLL); see `step`."""
        pol = self._policy(role)
        if self.active != role:
            self.activate(role)
        if restart_optimizer:
            pol.restart_optimizer()
        return step.train_step(pol, experiences, lam, objective, self.learner, self.rank, self.world_size,
                               self.device)

    # ------------------------------------------------------------------------------------------ weights

    def version(self, role: str) -> int:
        return self._policy(role).version

    def trained_groups(self, role: str) -> list[str]:
        return list(self._policy(role).trained)

    def offloaded_states(self, role: str) -> list[str]:
        return offload.offloaded_states(self._policy(role).engine)

    def reloads(self, role: str) -> int:
        """Times the role's offloaded states came back to the device."""
        return self._policy(role).reloads

    def reference_loaded(self, role: str) -> bool:
        return self._policy(role).reference is not None

    def _transport(self, role: str, kind: str):
        if (role, kind) not in self.transports:
            self.transports[(role, kind)] = make_transport(kind, self.weight_sync.bucket_mb, device=self.device)
        return self.transports[(role, kind)]

    def publish(self, role: str, transport_kind: str | None = None, form: str = "full"):
        """Every rank iterates (ZeRO-3 gathers); rank 0 packs and returns the bundle (object store) or
        broadcasts to the role's group and returns a receipt (collective); other ranks return None.
        `form`: "full" (every parameter, LoRA merged in) or "adapter" (only the LoRA matrices, for engines
        that load adapters; the bundle's meta then says the adapter's rank, alpha and targets)."""
        if form not in ("full", "adapter"):
            raise ValueError(f"publish form must be full or adapter, got {form!r}")
        pol = self._policy(role)  # an idle role's weight partitions stay on the device: no reload (offload.py)
        if form == "adapter" and not pol.lora:
            raise ValueError(f"publish({role!r}, form='adapter') needs learner.lora.rank > 0")
        params = (lora.adapter_tensors(pol.engine.module, pol.gathered, copy=pol.zero3) if form == "adapter"
                  else pol.full_parameters())
        if self.rank != 0:
            for _ in params:
                pass
            return None
        kind = transport_kind or self.weight_sync.transport
        bundle = self._transport(role, kind).publish(pol.version, params)
        bundle.meta.update(role=role, form=form)
        if form == "adapter":
            lc = self.learner.lora
            bundle.meta["lora"] = {"rank": lc.rank, "alpha": lc.alpha, "target_modules": list(lc.target_modules)}
        return bundle

    def open_sync_group(self, role: str, world: int, generation: int, transport: str | None = None) -> dict:
        """A pushing transport (collective, ipc), rank 0: start a new generation of the role's group, hosted
        here."""
        import dataclasses

        import ray

        ws = self.weight_sync
        rdv = self._transport(role, transport or ws.transport).open(ray.util.get_node_ip_address(), world,
                                                                     generation, ws.timeout_s, ws.backend)
        return dataclasses.asdict(rdv)

    def export_hf(self, role: str, path: str) -> None:
        """Write `role` as a Hugging Face folder (rank 0; every rank iterates for ZeRO-3's gathers)."""
        pol, sd = self._policy(role), self.state_dict(role)
        if self.rank == 0:
            checkpoint.save_hf(lora.hf_module(pol.engine.module), pol.tokenizer, sd, path)

    def state_dict(self, role: str) -> dict[str, torch.Tensor] | None:
        """Full CPU parameters (rank 0; None elsewhere): for tests and the HF export."""
        sd = {n: t.to("cpu", copy=True) for n, t in self._policy(role).full_parameters()}
        return sd if self.rank == 0 else None

    def adapter_state(self, role: str) -> dict[str, torch.Tensor] | None:
        """The role's LoRA matrices as CPU tensors under PEFT names (rank 0; None elsewhere)."""
        pol = self._policy(role)
        sd = lora.adapter_state(pol.engine.module, pol.gathered)
        return sd if self.rank == 0 else None

    def optimizer_state(self, role: str) -> dict:
        """This rank's optimizer state (its ZeRO partition) as CPU tensors: for tests of exact resume."""
        return self._policy(role).optimizer_state()

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self, path: str) -> None:
        """Write this rank's part of a checkpoint into `path` (the group renames it when all are done)."""
        rank_checkpoint.save(self, Path(path))

    def load(self, path: str) -> dict[str, int]:
        """Restore this rank's part of the checkpoint at `path`; returns each role's version."""
        return rank_checkpoint.load(self, Path(path))
