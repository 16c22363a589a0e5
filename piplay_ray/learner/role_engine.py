"""One trained role on one learner rank: its DeepSpeed engine and optimizer, how it is built from the
`learner` config section, and its parameters and residency (with `offload_inactive` the idle role's states
move to host memory, `offload`; on CPU the same calls run without copying).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from piplay_ray.cluster.heap import peak_rss
from piplay_ray.config import LearnerConfig
from piplay_ray.learner import lora, offload
from piplay_ray.learner.hidden import HiddenForward
from piplay_ray.learner.reference import Reference
from piplay_ray.learner.schedule import make_scheduler


def zero_stage(lc: LearnerConfig, world_size: int) -> int:
    """The ZeRO stage a rank runs: `learner.zero_stage`, but 2 for 3 on a single rank. One rank has nothing
    to partition the weights over, and ZeRO-3 would still gather every layer's weights before its forward and
    backward and re-partition them after: time for nothing. Stage 2 on one rank partitions nothing either and
    keeps what `offload_inactive` needs: DeepSpeed's ZeRO-1/2 optimizer moves an idle role's states (its
    weights too) with any optimizer; stage 0 could not offload at all. The cost: the rank loads the whole model
    on the host in float32 first (`load_model`). The checkpoint format follows the stage run, and a resume
    needs the same world size anyway (`learner.py`)."""
    return 2 if world_size == 1 and lc.zero_stage == 3 else lc.zero_stage


def ds_config(lc: LearnerConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config: one engine step per learner step; accumulation is driven by the learner."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": zero_stage(lc, world_size), "overlap_comm": False, "contiguous_gradients": True,
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


def load_model(path: str, config: dict, bf16: bool) -> torch.nn.Module:
    """The role's model. Under ZeRO-3 each rank builds only its partition: while an `HfDeepSpeedConfig` is alive,
    transformers runs `from_pretrained` inside `deepspeed.zero.Init` (in the dtype DeepSpeed trains in) and
    rank 0 alone copies the checkpoint in, layer by layer. Otherwise every rank would build the whole model on
    the CPU in float32 (33 GB of host memory per rank for an 8B model) and DeepSpeed would move it whole to
    the device before partitioning it. The config lives only for the load: a model loaded later in the same
    process (the KL reference) is whole."""
    from transformers import AutoModelForCausalLM

    if config["zero_optimization"]["stage"] != 3:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from transformers.integrations import HfDeepSpeedConfig

    alive = HfDeepSpeedConfig(config)  # noqa: F841  transformers holds only a weak reference to it
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)


class RoleEngine:
    """One trained role on one rank: its DeepSpeed engine, tokenizer, version counter and the groups it
    trained; `offloaded` while its states are in host memory."""

    def __init__(self, role: str, path: str, lc: LearnerConfig, world_size: int, device: torch.device):
        import deepspeed
        from transformers import AutoTokenizer

        self.role, self.path, self.version = role, path, 0
        self.trained: list[str] = []  # the group ids of every step, in order: the learner's own record
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.bf16 = use_bf16(lc.bf16, device)
        config = ds_config(lc, world_size, self.bf16)
        with peak_rss() as self.load_rss:  # what the rank itself holds at most while it loads
            model = load_model(path, config, self.bf16)
        if lc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.lora = lc.lora.rank > 0
        if self.lora:
            model = lora.wrap(model, lc.lora)
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], lc, device)
        sched = make_scheduler(opt, lc.lr_warmup_steps)
        self.forward = HiddenForward(model, share_prefix=not lc.gradient_checkpointing)  # before DeepSpeed wraps it
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=config)
        self.offloaded = False
        self.reloads = 0  # times its offloaded states came back (a phase switch, a save or a load)
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

    def restart_optimizer(self) -> None:
        """A fresh optimizer and warm-up (learner.optimizer_restart = iteration): Adam's moments and step counts
        dropped (each Adam variant DeepSpeed wraps builds them again at its next step), the schedule at step 0."""
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        inner.state.clear()
        self.scheduler.last_epoch = -1
        self.scheduler.step()

    def optimizer_state(self) -> dict:
        """This rank's optimizer state (its ZeRO partition) as CPU tensors: for tests of exact resume."""
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        return {f"{i}.{k}": v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                for i, st in enumerate(inner.state.values()) for k, v in st.items()}

    # ------------------------------------------------------------------------------------------ residency

    def offload(self, pin: bool) -> None:
        """Its states to host memory (`pin`: page-locked, on a GPU), unless they are there already."""
        if not self.offloaded:
            self.offloaded = offload.offload(self.engine, pin=pin)

    def reload(self) -> None:
        """Its states back on the device, if they were offloaded."""
        if self.offloaded:
            offload.reload(self.engine)
            self.offloaded = False
            self.reloads += 1

    @contextlib.contextmanager
    def resident(self, pin: bool) -> Iterator[RoleEngine]:
        """Its states on the device for one save or load; an idle role goes back after."""
        was = self.offloaded
        self.reload()
        try:
            yield self
        finally:
            if was:
                self.offload(pin)
