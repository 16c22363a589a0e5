"""The teacher actor: an EMA copy of the student that scores the student's tokens with the QCP in view.

It keeps the EMA master weights psi in float32 (so tau * (theta - psi) steps are not rounded away) and a
scoring backend: a transformers model (batched, left-padded forward; only the response logits are
materialised) or a vLLM engine (`prompt_topk`, i.e. prompt logprobs); what is scored and how is
`scoring.py`. Under `learner.lora` (`lora`) the masters are the EMA *adapter* over the frozen base
(adapter.py): each update is the student's adapter only. Every update carries the student's version;
an EMA step for a version the teacher already holds is skipped, so a retried call cannot apply the same step
twice. The driver reaches it through `client.TeacherClient`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import ray
import torch

from piplay_ray.cluster import devices
from piplay_ray.cluster.placement import resources
from piplay_ray.config import Config, LoraConfig, RolloutConfig, TeacherConfig
from piplay_ray.engines import make_engine, named_tensors
from piplay_ray.fault import dies_with_engine
from piplay_ray.records import Task, Trajectory
from piplay_ray.teacher import adapter as teacher_adapter
from piplay_ray.teacher import context as T
from piplay_ray.teacher import scoring as teacher_scoring
from piplay_ray.teacher.ema import EmaState, blend_, save_ema
from piplay_ray.teacher.gate import UpdateGate
from piplay_ray.weight_sync import receiver_for

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherImpl(EmaState):
    """Plain class behind the `Teacher` actor (usable in-process in tests and scripts).

    It reads the `teacher` section; of `rollout`, the model length and (vLLM backend) the engine settings;
    `dtype` is the model's (`model.dtype`), `seed` the run's and `lora` the learner's adapter settings when it
    trains one (`from_config` takes them from a whole config).
    """

    def __init__(self, model_path: str, teacher: TeacherConfig, rollout: RolloutConfig, *, dtype: str = "auto",
                 seed: int = 0, max_batch_tokens: int = 4096, lora: LoraConfig | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tcfg, self.seed, self.lora = teacher, seed, lora
        self.max_batch_tokens = max_batch_tokens
        self.max_len = rollout.max_model_len
        self.version = 0
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        index = devices.claim().index if self.tcfg.num_gpus > 0 and torch.cuda.is_available() else None
        self.device = torch.device("cpu") if index is None else torch.device("cuda", index)
        serve = self.serve_dtype = _DTYPES.get(dtype, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        # the vLLM backend's float32 EMA masters load straight onto the device that blends them
        ema = torch.device("cpu") if self.tcfg.backend != "vllm" or self.tcfg.ema_on_host else self.device
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                     **({"device_map": str(ema)} if ema.type == "cuda" else {}))
        self.alias: dict[str, str] | None = None  # canonical name of every full parameter, tied aliases included
        if lora is None:
            canon: dict[int, str] = {}
            self.alias = {name: canon.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}
        self.engine, self.model, self._base = None, None, None
        self._aliased = False  # the served model's parameters are the masters themselves
        if self.tcfg.backend == "vllm":
            base = {n: p.detach() for n, p in model.named_parameters()}
            self.master = base if lora is None else {n: t.to(ema) for n, t in
                                                    teacher_adapter.initial(model_path, lora).items()}
            del model
            # the teacher's own parallelism and memory share, not the rollout engines' (config.TeacherConfig)
            self.engine = make_engine("vllm", model_path, rollout, dtype=dtype, seed=seed,
                                      max_logprobs=max(64, self.tcfg.top_k),
                                      tensor_parallel_size=self.tcfg.tensor_parallel_size,
                                      gpu_memory_utilization=self.tcfg.gpu_memory_utilization, lora=lora)
            if lora is not None and self.engine.weight_form != "adapter":  # it gets base + EMA adapter merged
                self._base = base
                log.warning("teacher: %s; it gets the merged EMA adapter", self.engine.lora_note)
        else:
            if lora is not None:
                from piplay_ray.learner import lora as peft_lora

                model = peft_lora.wrap(model, lora).requires_grad_(False)
            self.model = model.to(self.device, serve).eval()
            if lora is not None:
                self._served = teacher_adapter.served(self.model)
                self.master = {n: torch.zeros(p.shape) for n, p in self._served.items()}
                self._copy_masters()  # PEFT starts A at random: the EMA adapter starts at zero
            else:
                self._served = dict(self.model.named_parameters())
                self._aliased = serve == torch.float32 and self.device.type == "cpu"
                self.master = ({n: p.data for n, p in self._served.items()} if self._aliased  # the model is the master
                               else {n: p.detach().float() for n, p in self._served.items()})  # on its device
        self._gate = UpdateGate()  # scoring calls together, an EMA update alone (and before later calls)
        self._forward = asyncio.Lock()  # the transformers backend runs one batched forward at a time
        self._receiver = None  # its place in the student's weight-sync group (collective transport)
        self.incarnation = uuid.uuid4().hex  # new on every (re)start of this actor

    @classmethod
    def from_config(cls, model_path: str, cfg: Config, **kw) -> TeacherImpl:
        """The teacher with what it reads of the whole config `cfg` (`teacher_args`)."""
        return cls(model_path, **teacher_args(cfg), **kw)

    # ------------------------------------------------------------------------------------- weights

    def _blend(self, weights: Any, tau: float) -> int:
        """psi <- (1 - tau) psi + tau theta over every master; theta streamed as (name, tensor)."""
        return blend_(self.master, named_tensors(weights), tau, self.alias)

    @torch.no_grad()
    def _copy_masters(self) -> None:
        for name, p in self._served.items():
            p.copy_(self.master[name].to(p.device, p.dtype))

    async def _push(self, version: int) -> None:
        if self.engine is not None:  # the serving dtype goes to the engine, never the fp32 masters
            weights = (teacher_adapter.merged(self._base, self.master, self.lora, self.serve_dtype)
                       if self._base is not None else ((n, t.to(self.serve_dtype)) for n, t in self.master.items()))
            if self.engine.weight_form == "adapter":  # vLLM loads an adapter from a folder
                await self.engine.aupdate_weights(version, weights)
            else:  # full weights stream into its workers, bucket by bucket: no file
                await self.engine.astream_weights(version, weights)
        elif not self._aliased:
            self._copy_masters()
        self.version = version

    @dies_with_engine
    async def ema_update(self, version: int, weights: Any) -> bool:
        """Blend the student's weights of `version` in with tau = teacher.ema_tau; False if already applied."""
        async with self._gate.updating():
            if version <= self.version:
                log.warning("teacher: EMA for version %d skipped (holding %d)", version, self.version)
                return False
            self._blend(weights, self.tcfg.ema_tau)
            await self._push(version)
            return True

    @dies_with_engine
    async def load(self, version: int, weights: Any) -> None:
        """psi <- theta exactly (teacher.init = iteration: the driver calls this at each iteration start)."""
        async with self._gate.updating():
            self._blend(weights, 1.0)
            await self._push(version)

    def get_version(self) -> int:
        return self.version

    async def save(self, folder: str) -> str:
        """The EMA to `folder/teacher.safetensors`, streamed in a thread, never beside an update (a sync's EMA
        step would tear the file): checkpoints and the client's snapshot after every update."""
        async with self._gate.scoring():
            return await asyncio.to_thread(save_ema, folder, self.master, self.version)

    def sync_member(self) -> tuple[str, int, int]:
        """(incarnation, ranks in the student's weight-sync group, EMA version) for the coordinator."""
        return self.incarnation, 1, self.version

    @dies_with_engine
    async def receive_weights(self, ticket: dict, mode: str = "skip") -> bool:
        """Take part in a collective sync of the student's group: `ema` blends the broadcast in (skipped,
        i.e. only drained, for a version already held), `load` sets psi to it, `skip` only drains it."""

        if mode not in ("ema", "load", "skip"):
            raise ValueError(f"receive_weights mode must be ema, load or skip, got {mode!r}")
        rx = self._receiver = receiver_for(ticket, self.device, self._receiver)
        if mode == "skip":
            await asyncio.to_thread(rx.drain, ticket)
            return False
        version = int(ticket["version"])
        async with self._gate.updating():
            if mode == "ema" and version <= self.version:
                log.warning("teacher: EMA for version %d skipped (holding %d)", version, self.version)
                await asyncio.to_thread(rx.drain, ticket)
                return False
            await asyncio.to_thread(self._blend, rx.receive(ticket), 1.0 if mode == "load" else self.tcfg.ema_tau)
            await self._push(version)
            return True

    @dies_with_engine
    async def asleep(self) -> None:
        """The vLLM engine frees its device memory until the next score or update (Engine.asleep)."""
        if self.engine is not None:
            await self.engine.asleep()

    # ------------------------------------------------------------------------------------- scoring

    @dies_with_engine
    async def score(self, trajectories: Sequence[Trajectory], tasks: Sequence[Task],
                    with_stats: bool = False) -> list[T.Scores] | tuple[list[T.Scores], dict[str, int]]:
        """Teacher top-K (ids, logprobs, tail) per response position of each trajectory, given its task
        (`teacher_scoring.plan`: rows are empty where mask is 0 and where a context cannot fit). `with_stats`
        also returns the counts of shortened contexts and unscored responses."""
        k, tail = self.tcfg.top_k, self.tcfg.tail_bucket
        jobs, out, stats = teacher_scoring.plan(self.tokenizer, self.tcfg, self.max_len, self.seed, trajectories, tasks)
        async with self._gate.scoring():
            if self.engine is not None:
                tops = await asyncio.gather(*(self.engine.prompt_topk(j.ids, j.start, k) for j in jobs))
                results = [teacher_scoring.rows_from_topk(top, j.mask, tail) for top, j in zip(tops, jobs, strict=True)]
            else:
                pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
                async with self._forward:
                    results = await asyncio.to_thread(teacher_scoring.score_batched, self.model, pad, self.device,
                                                      jobs, k, tail, self.max_batch_tokens)
        teacher_scoring.fill(out, jobs, results)
        return (out, stats) if with_stats else out

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


Teacher = ray.remote(TeacherImpl)


def teacher_args(cfg: Config) -> dict:
    """What a teacher reads of the whole config, as its constructor's keyword arguments."""
    return {"teacher": cfg.teacher, "rollout": cfg.rollout, "dtype": cfg.model.dtype, "seed": cfg.run.seed,
            "lora": cfg.learner.lora if cfg.learner.lora.rank else None}


def create_teacher(model_path: str, cfg: Config, placement=None):
    """Start the `Teacher` actor with the resources of the `teacher` config section (in its bundle of the
    run's `placement` when it has one), restarted up to `fault.max_actor_restarts` times."""
    own = resources(placement, "teacher", {"num_cpus": cfg.teacher.num_cpus, "num_gpus": cfg.teacher.num_gpus})
    return Teacher.options(**own, max_restarts=cfg.fault.max_actor_restarts,
                           max_concurrency=64).remote(model_path, **teacher_args(cfg))
