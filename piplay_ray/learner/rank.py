"""One learner rank: its DeepSpeed engine and optimizer per trained role, its steps, weights and checkpoints.

A plain class with no Ray at import: `learner.LearnerGroup` runs one per data-parallel rank as a Ray actor,
and bench/gpu_learner.py drives one directly on a GPU machine where Ray is not installed. The examiner and
the student share the rank's device and alternate by phase; with `offload_inactive` the idle role's states
move to host memory (`offload`; on CPU the same calls run without copying).

A step sees the whole global batch on every rank; `batching.plan` splits it into token-budget
micro-batches, the same count per rank. Each micro-batch loss is normalised by the global batch's
token (or sequence) count and multiplied by the world size, which cancels DeepSpeed's gradient
averaging, so the update equals one full-batch step whatever the world size and micro-batching.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from piplay_ray import assets
from piplay_ray.config import Config, LearnerConfig
from piplay_ray.learner import batching, checkpoint, lora, offload
from piplay_ray.learner.hidden import HiddenForward
from piplay_ray.learner.rank_env import rank_env
from piplay_ray.learner.reference import Reference
from piplay_ray.learner.schedule import make_scheduler
from piplay_ray.learner.weight_sync import make_transport
from piplay_ray.losses import collate, compute_loss, sft_loss, step_normalizers
from piplay_ray.records import Experience

log = logging.getLogger(__name__)
_ADDITIVE = {"loss", "pg_loss", "tokens"}  # summed over micro-batches; every other metric is a token mean
_MAXED = {"logp_mismatch_max"}  # the max over micro-batches and ranks


def ds_config(lc: LearnerConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config: one engine step per learner step; accumulation is driven by the learner."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def use_bf16(setting, device: torch.device) -> bool:
    """`learner.bf16`: auto means bf16 on a GPU that supports it, fp32 on CPU (exact, and no faster there)."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if setting and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("learner.bf16=true but this GPU does not support bf16")
    return bool(setting)


def make_optimizer(params, lc: LearnerConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW. With `offload_inactive` on a GPU, DeepSpeed's FusedAdam: ZeRO-3 offloads the states of no other
    optimizer (measured on an H200: with torch's AdamW the idle role silently stayed on the GPU). Its CUDA
    kernel is compiled on first use (nvcc), unless DeepSpeed was installed with DS_BUILD_FUSED_ADAM=1."""
    if device.type != "cuda" or not lc.offload_inactive:
        return torch.optim.AdamW(params, lr=lc.lr, weight_decay=lc.weight_decay, fused=device.type == "cuda")
    from deepspeed.ops.adam import FusedAdam

    try:
        return FusedAdam(params, lr=lc.lr, weight_decay=lc.weight_decay, adam_w_mode=True)
    except Exception as e:  # the kernel could not be built or loaded
        raise RuntimeError(f"learner.offload_inactive=true needs DeepSpeed's FusedAdam on GPUs, which failed to "
                           f"load ({type(e).__name__}: {e}); install DeepSpeed with DS_BUILD_FUSED_ADAM=1 or "
                           "where nvcc is available, or set learner.offload_inactive=false") from e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _validate(experiences: Sequence[Experience]) -> None:
    for i, e in enumerate(experiences):
        n = len(e.response_ids)
        if not e.prompt_ids or not n:
            raise ValueError(f"experience {i}: needs a non-empty prompt and response")
        if len(e.mask) != n or len(e.logprobs) != n:
            raise ValueError(f"experience {i}: response_ids ({n}), mask ({len(e.mask)}) and logprobs "
                             f"({len(e.logprobs)}) must have the same length")
        for key in ("teacher_ids", "teacher_logprobs", "teacher_tail"):
            value = getattr(e, key)
            if value is not None and len(value) != n:
                raise ValueError(f"experience {i}: {key} has {len(value)} positions, the response {n}")


class _Policy:
    """One trained role on one rank: its DeepSpeed engine, tokenizer and version counter."""

    def __init__(self, role: str, path: str, cfg: Config, world_size: int, device: torch.device):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lc = cfg.learner
        self.role, self.path, self.version = role, path, 0
        self.trained: list[str] = []  # the group ids of every step, in order: the learner's own record
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if lc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.lora = lc.lora.rank > 0
        if self.lora:
            model = lora.wrap(model, lc.lora)
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], lc, device)
        sched = make_scheduler(opt, lc.lr_warmup_steps)
        self.bf16 = use_bf16(lc.bf16, device)
        self.forward = HiddenForward(model)  # hooks the module before DeepSpeed wraps it
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(lc, world_size, self.bf16))
        self.offloaded = False
        self.reference = None
        if lc.loss.kl_beta > 0:  # beta * KL to the frozen initial policy; beta = 0 loads nothing

            self.reference = Reference(path, device, torch.bfloat16 if self.bf16 else torch.float32)

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    def param_metadata(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, full shape) without gathering (ZeRO-3 keeps the full shape in `ds_shape`)."""
        module = self.engine.module
        named = lora.base_parameters(module) if self.lora else module.named_parameters()
        return [(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in named]

    def gathered(self, params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
        """Full `params` inside the context (ZeRO-3 gathers them; otherwise they already are)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for every parameter, LoRA merged in; under ZeRO-3 all ranks iterate together."""
        module = self.engine.module
        if self.lora:
            yield from lora.merged_parameters(module, self.gathered, copy=self.zero3)
            return
        for name, p in module.named_parameters():
            with self.gathered([p]):
                yield name, p.data.detach().clone() if self.zero3 else p.data.detach()


class LearnerWorkerImpl:
    """One data-parallel rank (plain class; `LearnerWorker` is its actor)."""

    def __init__(self, cfg: dict, roles: Sequence[str], rank: int, world_size: int):
        self.cfg = Config.model_validate(cfg)
        self.roles, self.rank, self.world_size = tuple(roles), rank, world_size
        self.policies: dict[str, _Policy] = {}
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
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, init_method=f"tcp://{master_addr}:{master_port}",
                                   rank=self.rank, world_size=self.world_size)
        # DeepSpeed's CPU all-reduce maps every rank's /dev/shm buffer during init; once all ranks are past
        # it the names can go (the mappings stay valid), so a crash cannot leak RAM-backed files.
        torch.distributed.barrier()
        self.close()
        self.device = torch.device(get_accelerator().current_device_name())
        torch.manual_seed(self.cfg.run.seed)
        for role in self.roles:
            path = assets.resolve_model(self.cfg.model.path_for(role))
            self.policies[role] = _Policy(role, path, self.cfg, self.world_size, self.device)
        self.activate(self.roles[0])
        return {"rank": self.rank, "device": str(self.device), "bf16": self.policies[self.roles[0]].bf16}

    # ------------------------------------------------------------------------------------------ phases

    def close(self) -> None:
        """Unlink DeepSpeed's CPU all-reduce buffers in /dev/shm (RAM): DeepSpeed never deletes them."""
        import glob

        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port:
            for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_*"):
                try:
                    os.unlink(f)
                except OSError:
                    pass

    def activate(self, role: str) -> None:
        """Make `role` resident on the device; with offload_inactive, the other roles go to host memory."""
        self._policy(role)
        self.active = role
        if not self.cfg.learner.offload_inactive:
            return
        for name, pol in self.policies.items():
            if name != role and not pol.offloaded:
                pol.offloaded = offload.offload(pol.engine, pin=self.device.type == "cuda")
            elif name == role and pol.offloaded:
                offload.reload(pol.engine)
                pol.offloaded = False

    @contextlib.contextmanager
    def _resident(self, role: str) -> Iterator[_Policy]:
        """The role's states on the device for one gather, save or load; an idle role goes back after."""
        pol = self._policy(role)
        was = pol.offloaded
        if was:
            offload.reload(pol.engine)
            pol.offloaded = False
        try:
            yield pol
        finally:
            if was:
                pol.offloaded = offload.offload(pol.engine, pin=self.device.type == "cuda")

    def _policy(self, role: str) -> _Policy:
        if role not in self.policies:
            raise ValueError(f"role {role!r} is not trained by this learner (roles: {', '.join(self.policies)})")
        return self.policies[role]

    # ------------------------------------------------------------------------------------------ step

    def train_step(self, role: str, experiences: list[Experience], lam: float = 0.0,
                   objective: str = "rl") -> dict[str, float]:
        """One optimizer step; `objective` "rl" (the π-Play loss) or "sft" (the warm start's NLL)."""

        pol = self._policy(role)
        if self.active != role:
            self.activate(role)
        if not experiences:
            raise ValueError(f"train_step({role!r}): empty batch")
        wrong = {e.role for e in experiences} - {role}
        if wrong:
            raise ValueError(f"train_step({role!r}): got experiences of role(s) {sorted(wrong)}")
        _validate(experiences)  # on every rank before any collective: a bad record fails all ranks, never hangs one
        lc = self.cfg.learner
        normalizer, distill_norm = step_normalizers(experiences, lc.loss)
        if objective == "sft":  # a token mean over the demonstrations' own turns
            normalizer = float(sum(sum(e.mask) for e in experiences))
        if normalizer == 0:
            raise ValueError(f"train_step({role!r}): no experience has a trained (mask==1) token")
        plan = batching.plan([e.num_tokens for e in experiences], lc.micro_batch_tokens, self.world_size)
        mine = plan[self.rank]
        engine = pol.engine
        engine.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for j, mb in enumerate(mine):
            real = bool(mb)
            batch = collate([experiences[i] for i in (mb or [0])], pol.pad_id)  # filler: zero-weight copy
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if objective == "rl" and pol.reference is not None:
                batch["ref_logprobs"] = pol.reference.logprobs(batch, lc.loss.chunk_tokens)
            hidden = pol.forward(engine, batch)
            if objective == "sft":
                loss, metrics = sft_loss(hidden, batch, normalizer, pol.forward.head, lc.loss.chunk_tokens)
            else:
                loss, metrics = compute_loss(hidden, batch, lc.loss, lam, normalizer=normalizer, head=pol.forward.head,
                                             distill_norm_total=distill_norm)
            engine.set_gradient_accumulation_boundary(j == len(mine) - 1)
            engine.backward(loss * (self.world_size if real else 0.0), scale_wrt_gas=False)
            if real:
                for k, v in metrics.items():
                    if k in _MAXED:
                        sums[k] = max(sums.get(k, v), v)
                        continue
                    w = 1.0 if k in _ADDITIVE else metrics.get("tokens", 0.0)
                    sums[k] = sums.get(k, 0.0) + v * w
        lr = float(pol.scheduler.get_last_lr()[0])  # the rate this step uses (warm-up moves it after the step)
        engine.step()
        step_s = time.perf_counter() - t0
        pol.version += 1
        pol.trained.extend(dict.fromkeys(e.group_id for e in experiences))
        grad_norm = engine.get_global_grad_norm()
        local = {"sums": sums, "tokens_seen": sum(experiences[i].num_tokens for mb in mine for i in mb)}
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, local)
        total: dict[str, float] = {}
        for g in gathered:
            for k, v in g["sums"].items():
                total[k] = max(total.get(k, v), v) if k in _MAXED else total.get(k, 0.0) + v
        trained = total.get("tokens", 0.0)
        out = {k: (v if k in _ADDITIVE | _MAXED else v / max(trained, 1.0)) for k, v in total.items()}
        seen = sum(g["tokens_seen"] for g in gathered)
        out.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   lr=lr, step_time_s=step_s, tokens_per_s=seen / step_s,
                   total_tokens=float(seen), micro_batches=float(len(mine) * self.world_size),
                   sequences=float(len(experiences)), version=float(pol.version))
        return out

    # ------------------------------------------------------------------------------------------ weights

    def version(self, role: str) -> int:
        return self._policy(role).version

    def trained_groups(self, role: str) -> list[str]:
        return list(self._policy(role).trained)

    def offloaded_states(self, role: str) -> list[str]:
        return offload.offloaded_states(self._policy(role).engine)

    def reference_loaded(self, role: str) -> bool:
        return self._policy(role).reference is not None

    def _transport(self, role: str, kind: str):
        if (role, kind) not in self.transports:
            self.transports[(role, kind)] = make_transport(kind, self.cfg.weight_sync.bucket_mb, device=self.device)
        return self.transports[(role, kind)]

    def publish(self, role: str, transport_kind: str | None = None, form: str = "full"):
        """Every rank iterates (ZeRO-3 gathers); rank 0 packs and returns the bundle (object store) or
        broadcasts to the role's group and returns a receipt (collective); other ranks return None.
        `form`: "full" (every parameter, LoRA merged in) or "adapter" (only the LoRA matrices, for engines
        that load adapters; the bundle's meta then says the adapter's rank, alpha and targets)."""
        if form not in ("full", "adapter"):
            raise ValueError(f"publish form must be full or adapter, got {form!r}")
        with self._resident(role) as pol:
            if form == "adapter" and not pol.lora:
                raise ValueError(f"publish({role!r}, form='adapter') needs learner.lora.rank > 0")
            params = (lora.adapter_tensors(pol.engine.module, pol.gathered, copy=pol.zero3) if form == "adapter"
                      else pol.full_parameters())
            if self.rank != 0:
                for _ in params:
                    pass
                return None
            kind = transport_kind or self.cfg.weight_sync.transport
            bundle = self._transport(role, kind).publish(pol.version, params)
        bundle.meta.update(role=role, form=form)
        if form == "adapter":
            lc = self.cfg.learner.lora
            bundle.meta["lora"] = {"rank": lc.rank, "alpha": lc.alpha, "target_modules": list(lc.target_modules)}
        return bundle

    def open_sync_group(self, role: str, world: int, generation: int) -> dict:
        """Collective transport, rank 0: start a new generation of the role's group, hosted here."""
        import dataclasses

        import ray

        ws = self.cfg.weight_sync
        rdv = self._transport(role, "collective").open(ray.util.get_node_ip_address(), world, generation,
                                                        ws.timeout_s, ws.backend)
        return dataclasses.asdict(rdv)

    def export_hf(self, role: str, path: str) -> None:
        """Write `role` as a Hugging Face folder (rank 0; every rank iterates for ZeRO-3's gathers)."""
        with self._resident(role) as pol:
            sd = self.state_dict(role)
            if self.rank == 0:
                checkpoint.save_hf(lora.hf_module(pol.engine.module), pol.tokenizer, sd, path)

    def state_dict(self, role: str) -> dict[str, torch.Tensor] | None:
        """Full CPU parameters (rank 0; None elsewhere): for tests and the HF export."""
        with self._resident(role) as pol:
            sd = {n: t.to("cpu", copy=True) for n, t in pol.full_parameters()}
        return sd if self.rank == 0 else None

    def adapter_state(self, role: str) -> dict[str, torch.Tensor] | None:
        """The role's LoRA matrices as CPU tensors under PEFT names (rank 0; None elsewhere)."""
        with self._resident(role) as pol:
            sd = lora.adapter_state(pol.engine.module, pol.gathered)
        return sd if self.rank == 0 else None

    def optimizer_state(self, role: str) -> dict:
        """This rank's optimizer state (its ZeRO partition) as CPU tensors: for tests of exact resume."""
        opt = self._policy(role).engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        return {f"{i}.{k}": v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                for i, st in enumerate(inner.state.values()) for k, v in st.items()}

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self, path: str) -> None:
        """Write this rank's part of a checkpoint into `path` (the group renames it when all are done)."""
        path = Path(path)
        for role, pol in self.policies.items():
            with self._resident(role):
                sd = self.state_dict(role)
                if self.rank == 0:
                    checkpoint.save_hf(lora.hf_module(pol.engine.module), pol.tokenizer, sd, path / role)
                if pol.lora:
                    adapter = self.adapter_state(role)
                    if self.rank == 0:
                        lora.save_adapter(pol.engine.module, adapter, path / role / lora.ADAPTER_DIR)
                # with LoRA the frozen base is the model path's own weights: only the adapter is state
                pol.engine.save_checkpoint(str(path / role / "train_state"), tag="state", save_latest=False,
                                           client_state={"version": pol.version, "trained": pol.trained},
                                           exclude_frozen_parameters=pol.lora)
        (path / "rng").mkdir(exist_ok=True)
        torch.save(checkpoint.rng_state(), path / "rng" / f"rank-{self.rank}.pt")
        torch.distributed.barrier()

    def load(self, path: str) -> dict[str, int]:
        path = Path(path)
        for role, pol in self.policies.items():
            if not (path / role / "train_state").is_dir():
                raise FileNotFoundError(f"{path}: no training state for role {role!r}")
            lora.check_checkpoint(path / role, pol.lora)
            with self._resident(role):  # DeepSpeed loads into resident buffers only
                _, client = pol.engine.load_checkpoint(str(path / role / "train_state"), tag="state",
                                                       load_module_strict=not pol.lora,  # no frozen base
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
            if client is None:
                raise RuntimeError(f"{path}: DeepSpeed could not load the {role} state")
            pol.version, pol.trained = int(client["version"]), list(client.get("trained", []))
        rng = path / "rng" / f"rank-{self.rank}.pt"
        if rng.is_file():
            checkpoint.set_rng_state(torch.load(rng, weights_only=False))
        return {role: pol.version for role, pol in self.policies.items()}
