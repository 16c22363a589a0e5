"""Rollout workers: Ray actors that each hold one engine and run many agent trajectories at once.

A :class:`RolloutWorker` is an async actor: every trajectory is a coroutine of :func:`~piplay_ray.method.agent.run_agent`,
so while some wait on the search env the engine batches the others' turns. The workers of one role are owned
by a :class:`~piplay_ray.actors.rollout_pool.RolloutPool`, which spreads requests over them, pushes weights and
restarts them.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace

import ray

from piplay_ray.cluster import devices
from piplay_ray.config import Config, LoraConfig, RolloutConfig
from piplay_ray.engines import make_engine
from piplay_ray.engines.base import SamplingSpec
from piplay_ray.fault import dies_with_engine
from piplay_ray.method import protocol
from piplay_ray.method.agent import run_agent
from piplay_ray.records import Doc, Trajectory
from piplay_ray.roles import TRAINED


def turn_limits(cfg: Config) -> dict[str, int]:
    """Each trained role's `max_turns` (its config section): a worker may run either role's turn format."""
    return {r: getattr(cfg, r).max_turns for r in TRAINED}


class RolloutWorkerImpl:
    """One engine + the agent loop (plain class; `RolloutWorker` is its actor). `rollout` is the rollout
    config section, `search` a search env handle (see actors/search_env.py), `dtype` the model's
    (`model.dtype`), `max_turns` role -> turn limit (`turn_limits`) and `lora` the learner's adapter
    settings when it trains one (`learner.lora`; the engine serves the adapter where it can)."""

    def __init__(self, role: str, model_path: str, rollout: RolloutConfig, search, *, max_turns: Mapping[str, int],
                 dtype: str = "auto", seed: int = 0, lora: LoraConfig | None = None):
        import torch
        from transformers import AutoTokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(max(1, int(rollout.num_cpus_per_worker)))  # no oversubscription
        self.role, self.rollout, self.search = role, rollout, search
        r = rollout
        devices.claim()  # before the engine starts its processes: they must see only this actor's GPUs
        self.engine = make_engine(r.engine, model_path, r, dtype=dtype, seed=seed, lora=lora)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.spec = SamplingSpec(max_tokens=r.turn_tokens, temperature=r.temperature, top_p=r.top_p)
        self.max_turns = dict(max_turns)
        self.stats = {"trajectories": 0, "generated_tokens": 0, "inserted_tokens": 0, "busy_s": 0.0}
        self._inflight = 0
        self._busy_since = 0.0
        self.incarnation = uuid.uuid4().hex  # new on every (re)start of this actor

    def ready(self) -> bool:
        return True

    def identity(self) -> tuple[str, int]:
        """(incarnation token, weight version): how the pool notices a restart and stale weights."""
        return self.incarnation, self.engine.version

    def get_version(self) -> int:
        return self.engine.version

    def weight_form(self) -> tuple[str, str | None]:
        """(what a weight sync must send this engine, "full" or "adapter"; why not "adapter" under LoRA)."""
        return self.engine.weight_form, self.engine.lora_note

    def sync_member(self) -> tuple[str, int, int]:
        """(incarnation, ranks taken in the role's weight-sync group, weight version) for the coordinator."""
        return self.incarnation, self.engine.group_ranks, self.engine.version

    @dies_with_engine
    async def receive_weights(self, ticket: dict) -> int:
        """Take part in a collective sync of this role's group; trajectories started later carry its version."""
        return await self.engine.areceive_weights(ticket)

    async def _one(self, prompt_ids: list[int], role: str, temperature: float | None = None,
                   max_turns: int | None = None, priority: int = 0) -> Trajectory:
        if self._inflight == 0:
            self._busy_since = time.perf_counter()
        self._inflight += 1
        try:
            r = self.rollout
            spec = replace(self.spec, priority=priority,
                           temperature=self.spec.temperature if temperature is None else temperature)
            traj = await run_agent(self.engine, self.search, self.tokenizer, prompt_ids, spec,
                                   max_turns or self.max_turns[role], role=role, version=self.engine.version,
                                   max_response_tokens=r.max_response_tokens, max_context=r.max_model_len,
                                   max_info_tokens=r.max_info_tokens)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self.stats["busy_s"] += time.perf_counter() - self._busy_since
        generated = sum(traj.mask)
        self.stats["trajectories"] += 1
        self.stats["generated_tokens"] += generated
        self.stats["inserted_tokens"] += len(traj.mask) - generated
        return traj

    @dies_with_engine
    async def rollouts(self, prompts: list[list[int]], role: str | None = None, temperature: float | None = None,
                       max_turns: int | None = None, priority: int = 0) -> list[Trajectory]:
        """One trajectory per prompt (token ids), all in flight together; `role` sets the turn format,
        `temperature` overrides the config's (0 = greedy, e.g. for evaluation), `max_turns` the role's;
        `priority` orders the engine's waiting turns (`SamplingSpec.priority`: the learner step's index)."""
        return list(await asyncio.gather(*[self._one(p, role or self.role, temperature, max_turns, priority)
                                           for p in prompts]))

    async def student_rollouts(self, questions: list[str], n: int, temperature: float | None = None,
                               closed_book: bool = False, priority: int = 0) -> list[list[Trajectory]]:
        """`n` trajectories per question; `closed_book` asks for a direct answer in one turn, no search."""
        prompt = protocol.closed_book_prompt_ids if closed_book else protocol.student_prompt_ids
        prompts = [prompt(self.tokenizer, q) for q in questions]
        flat = await self.rollouts([p for p in prompts for _ in range(n)], "student", temperature,
                                   1 if closed_book else None, priority)
        return [flat[i * n : (i + 1) * n] for i in range(len(questions))]

    async def examiner_rollouts(self, docs: list[Doc], hops: list[int], priority: int = 0) -> list[Trajectory]:
        prompts = [protocol.examiner_prompt_ids(self.tokenizer, d, h) for d, h in zip(docs, hops, strict=True)]
        trajs = await self.rollouts(prompts, "examiner", priority=priority)
        for t, h, d in zip(trajs, hops, docs, strict=True):
            t.extra.update(hop_target=h, source_id=d.id)
        return trajs

    @dies_with_engine
    async def teacher_topk(self, jobs: list[tuple[list[int], int]], k: int, teacher: tuple[int, list]) -> list:
        """The top-K of each (token ids, start) job with the teacher's adapter (teacher.backend: shared).
        `teacher` is (version, [adapter]): the adapter as an object-store reference, fetched only when the
        engine holds another version (a new EMA step, or this worker restarted), or as the tensors."""
        version, (weights,) = teacher
        if self.engine.teacher_version != version:
            if isinstance(weights, ray.ObjectRef):
                weights = await weights
            await self.engine.aload_teacher(version, weights)
        return list(await asyncio.gather(*(self.engine.teacher_topk(ids, start, k) for ids, start in jobs)))

    @dies_with_engine
    async def update_weights(self, version: int, weights) -> int:
        """Replace the engine's weights; trajectories started later carry `version`."""
        await self.engine.aupdate_weights(version, weights)
        return self.engine.version

    @dies_with_engine
    async def asleep(self) -> None:
        """The engine frees its device memory until next used (Engine.asleep)."""
        await self.engine.asleep()

    def metrics(self) -> dict:
        busy = self.stats["busy_s"]
        return {**self.stats, "inflight": self._inflight,
                "generated_tokens_per_s": self.stats["generated_tokens"] / busy if busy else 0.0}

    def shutdown(self) -> None:
        self.engine.shutdown()


RolloutWorker = ray.remote(RolloutWorkerImpl)
