"""The teacher as a second adapter on the student's rollout engines (`teacher.backend: shared`, with learner.lora).

No teacher model, actor or GPU: the teacher's EMA adapter (adapter.py: float32 masters, megabytes)
lives here, on the driver, and each score request hands it to the student's engines by object-store reference;
an engine fetches it only when it holds another version (a new EMA step, or a restarted worker) and scores
the teacher context with it in place of the student's adapter: prompt logprobs, top-K and tail as a separate
teacher on an engine gives them (`scoring.py`). It is a `TeacherHandle` like `TeacherClient`, so the loop does not
know which teacher it has; its EMA is driver state, saved in the checkpoint's teacher file like a teacher's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import ray
import torch

from piplay_ray.config import Config, LoraConfig, TeacherConfig
from piplay_ray.engines import named_tensors
from piplay_ray.records import Task, Trajectory
from piplay_ray.teacher import adapter as teacher_adapter
from piplay_ray.teacher import scoring as teacher_scoring
from piplay_ray.teacher.ema import EmaState, blend_


class SharedTeacher(EmaState):
    """`pool`: the student's `RolloutPool` (its `teacher_topk`); `initial`: the zero EMA adapter
    (`teacher_adapter.initial`); `put` stores the adapter for the workers (ray.put; tests pass it through)."""

    form = "adapter"  # its EMA takes the student's adapter

    def __init__(self, pool, tokenizer, teacher: TeacherConfig, lora: LoraConfig, initial: dict[str, torch.Tensor], *,
                 max_len: int, seed: int = 0, put: Callable = ray.put):
        self.pool, self.tokenizer, self.tcfg, self.lora = pool, tokenizer, teacher, lora
        self.max_len, self.seed, self._put = max_len, seed, put
        self._initial = initial
        self.restarts, self.last_error = 0, None  # nothing to restart: the health report's fields
        self._lock = asyncio.Lock()
        self.reset()

    @classmethod
    def from_config(cls, pool, model_path: str, cfg: Config) -> SharedTeacher:
        from transformers import AutoTokenizer

        return cls(pool, AutoTokenizer.from_pretrained(model_path), cfg.teacher, cfg.learner.lora,
                   teacher_adapter.initial(model_path, cfg.learner.lora), max_len=cfg.rollout.max_model_len,
                   seed=cfg.run.seed)

    def reset(self) -> None:
        """Back to the initial (zero) EMA adapter, version 0."""
        self.master = {n: t.detach().float().clone() for n, t in self._initial.items()}
        self.version, self._served = 0, None

    def _blend(self, version: int, weights, tau: float) -> None:
        blend_(self.master, named_tensors(weights), tau)
        self.version, self._served = version, None

    async def ema_update(self, version: int, weights) -> bool:
        """ema <- (1 - tau) ema + tau adapter (tau = teacher.ema_tau); False for a version already applied."""
        async with self._lock:
            if version <= self.version:
                return False
            self._blend(version, weights, self.tcfg.ema_tau)
            return True

    async def load(self, version: int, weights) -> None:
        """ema <- the adapter exactly."""
        async with self._lock:
            self._blend(version, weights, 1.0)

    async def ensure(self) -> int:
        return self.version

    async def score(self, trajectories: Sequence[Trajectory], tasks: Sequence[Task], with_stats: bool = False):
        """As `TeacherImpl.score`, on the student's engines with the EMA adapter."""
        k, tail = self.tcfg.top_k, self.tcfg.tail_bucket
        jobs, out, stats = teacher_scoring.plan(self.tokenizer, self.tcfg, self.max_len, self.seed, trajectories, tasks)
        if jobs:
            async with self._lock:  # one EMA version for the whole request
                if self._served is None:  # a list, so that Ray hands the reference over unfetched
                    self._served = (self.version, [self._put({n: t.clone() for n, t in self.master.items()})])
                tops = await self.pool.teacher_topk([(j.ids, j.start) for j in jobs], k, self._served)
            teacher_scoring.fill(out, jobs, [teacher_scoring.rows_from_topk(top, j.mask, tail)
                                             for top, j in zip(tops, jobs, strict=True)])
        return (out, stats) if with_stats else out
