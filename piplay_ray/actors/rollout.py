"""Rollout workers: Ray actors that each hold one engine and run many agent trajectories at once.

A :class:`RolloutWorker` is an async actor: every trajectory is a coroutine of :func:`~piplay_ray.agent.run_agent`,
so while some wait on the search env the engine batches the others' turns. A :class:`RolloutPool` owns the
workers of one role (examiner or student weights), spreads requests over them and pushes new weights to all.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import replace

import ray

from piplay_ray import protocol
from piplay_ray.agent import run_agent
from piplay_ray.engines.base import SamplingSpec
from piplay_ray.records import Doc, Trajectory


@ray.remote
class RolloutWorker:
    """One engine + the agent loop. `search` is a search env handle (see actors/search_env.py)."""

    def __init__(self, role: str, model_path: str, cfg, search, seed: int = 0):
        import os

        import torch
        from transformers import AutoTokenizer

        from piplay_ray.engines import make_engine

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(max(1, int(cfg.rollout.num_cpus_per_worker)))  # no oversubscription
        self.role, self.cfg, self.search = role, cfg, search
        r = cfg.rollout
        self.engine = make_engine(r.engine, model_path, r, dtype=cfg.model.dtype, seed=seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.spec = SamplingSpec(max_tokens=r.max_tokens_per_turn, temperature=r.temperature, top_p=r.top_p)
        self.max_turns = {"examiner": cfg.examiner.max_turns, "student": cfg.student.max_turns}
        self.stats = {"trajectories": 0, "generated_tokens": 0, "inserted_tokens": 0, "busy_s": 0.0}
        self._inflight = 0
        self._busy_since = 0.0

    def ready(self) -> bool:
        return True

    def get_version(self) -> int:
        return self.engine.version

    async def _one(self, prompt_ids: list[int], role: str, temperature: float | None = None) -> Trajectory:
        if self._inflight == 0:
            self._busy_since = time.perf_counter()
        self._inflight += 1
        try:
            r = self.cfg.rollout
            spec = self.spec if temperature is None else replace(self.spec, temperature=temperature)
            traj = await run_agent(self.engine, self.search, self.tokenizer, prompt_ids, spec,
                                   self.max_turns[role], role=role, version=self.engine.version,
                                   max_response_tokens=r.max_response_tokens, max_context=r.max_model_len)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self.stats["busy_s"] += time.perf_counter() - self._busy_since
        generated = sum(traj.mask)
        self.stats["trajectories"] += 1
        self.stats["generated_tokens"] += generated
        self.stats["inserted_tokens"] += len(traj.mask) - generated
        return traj

    async def rollouts(self, prompts: list[list[int]], role: str | None = None,
                       temperature: float | None = None) -> list[Trajectory]:
        """One trajectory per prompt (token ids), all in flight together; `role` sets the turn format,
        `temperature` overrides the config's (0 = greedy, e.g. for evaluation)."""
        return list(await asyncio.gather(*[self._one(p, role or self.role, temperature) for p in prompts]))

    async def student_rollouts(self, questions: list[str], n: int,
                               temperature: float | None = None) -> list[list[Trajectory]]:
        prompts = [protocol.student_prompt_ids(self.tokenizer, q) for q in questions]
        flat = await self.rollouts([p for p in prompts for _ in range(n)], "student", temperature)
        return [flat[i * n : (i + 1) * n] for i in range(len(questions))]

    async def examiner_rollouts(self, docs: list[Doc], hops: list[int]) -> list[Trajectory]:
        prompts = [protocol.examiner_prompt_ids(self.tokenizer, d, h) for d, h in zip(docs, hops, strict=True)]
        trajs = await self.rollouts(prompts, "examiner")
        for t, h, d in zip(trajs, hops, docs, strict=True):
            t.extra.update(hop_target=h, source_id=d.id)
        return trajs

    async def update_weights(self, version: int, weights) -> int:
        """Replace the engine's weights; trajectories started later carry `version`."""
        update = getattr(self.engine, "aupdate_weights", None)
        if update is not None:
            await update(version, weights)
        else:
            self.engine.update_weights(version, weights)
        return self.engine.version

    def metrics(self) -> dict:
        busy = self.stats["busy_s"]
        return {**self.stats, "inflight": self._inflight,
                "generated_tokens_per_s": self.stats["generated_tokens"] / busy if busy else 0.0}

    def shutdown(self) -> None:
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


def _split(n_items: int, n_parts: int) -> list[range]:
    """Contiguous, nearly equal ranges (the first ones one longer), in order."""
    q, r = divmod(n_items, n_parts)
    bounds = list(itertools.accumulate([q + (i < r) for i in range(n_parts)], initial=0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


class RolloutPool:
    """`cfg.rollout.workers_per_role` workers holding one role's weights; requests are split across them."""

    def __init__(self, role: str, model_path: str, cfg, search_pool, name: str | None = None):
        if role not in ("examiner", "student"):
            raise ValueError(f"role must be examiner or student, got {role!r}")
        r = cfg.rollout
        self.role, self.cfg = role, cfg
        self.workers = [
            RolloutWorker.options(num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker * r.tensor_parallel_size,
                                  max_restarts=cfg.fault.max_actor_restarts,
                                  name=f"{name}-{i}" if name else None)
            .remote(role, model_path, cfg, search_pool, seed=cfg.run.seed + 1000 * i)
            for i in range(r.workers_per_role)
        ]
        self.version = 0

    def wait_ready(self, timeout_s: float = 900) -> None:
        ray.get([w.ready.remote() for w in self.workers], timeout=timeout_s)

    async def student_rollouts(self, questions: Sequence[str], n: int,
                               temperature: float | None = None) -> list[list[Trajectory]]:
        """`n` trajectories for each question; a question's samples stay on one worker (same prefix)."""
        parts = _split(len(questions), len(self.workers))
        outs = await asyncio.gather(*[w.student_rollouts.remote([questions[i] for i in part], n, temperature)
                                      for w, part in zip(self.workers, parts, strict=True) if part])
        return [group for out in outs for group in out]

    async def examiner_rollouts(self, docs: Sequence[Doc], hops: Sequence[int]) -> list[Trajectory]:
        if len(docs) != len(hops):
            raise ValueError(f"{len(docs)} docs but {len(hops)} hop targets")
        parts = _split(len(docs), len(self.workers))
        outs = await asyncio.gather(*[w.examiner_rollouts.remote([docs[i] for i in part], [hops[i] for i in part])
                                      for w, part in zip(self.workers, parts, strict=True) if part])
        return [t for out in outs for t in out]

    def _weights_arg(self, weights):
        """A learner bundle travels as is (it knows how to fetch its tensors); plain pairs go to the object
        store once, so every worker reads the same copy."""
        if hasattr(weights, "named_tensors"):
            return weights
        from piplay_ray.engines import named_tensors

        return ray.put(list(named_tensors(weights)))

    async def aupdate_weights(self, version: int, weights) -> None:
        arg = self._weights_arg(weights)
        await asyncio.gather(*[w.update_weights.remote(version, arg) for w in self.workers])
        self.version = version

    def update_weights(self, version: int, weights) -> None:
        """Push `weights` (pairs or a bundle with `named_tensors()`) to every worker; returns when all hold them."""
        arg = self._weights_arg(weights)
        ray.get([w.update_weights.remote(version, arg) for w in self.workers])
        self.version = version

    def metrics(self) -> dict:
        per = ray.get([w.metrics.remote() for w in self.workers])
        total = {k: sum(m[k] for m in per) for k in ("trajectories", "generated_tokens", "inserted_tokens")}
        total["generated_tokens_per_s"] = sum(m["generated_tokens_per_s"] for m in per)
        return {**total, "workers": per}

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.get(w.shutdown.remote(), timeout=60)
            except Exception:
                pass
            ray.kill(w)
        self.workers = []
