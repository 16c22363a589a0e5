"""Rollout workers: Ray actors that each hold one engine and run many agent trajectories at once.

A :class:`RolloutWorker` is an async actor: every trajectory is a coroutine of :func:`~piplay_ray.agent.run_agent`,
so while some wait on the search env the engine batches the others' turns. A :class:`RolloutPool` owns the
workers of one role (examiner or student weights), spreads requests over them and pushes new weights to all.

Faults: workers are restartable Ray actors. The pool keeps the latest weights it pushed and, before every
request, asks the worker who it is (a per-process incarnation token and its weight version): a restarted
worker (new token, old version) gets the latest weights before it produces anything. A worker that dies
mid-request has its share of the request re-issued, on the restarted actor or the next worker, up to
`fault.max_task_retries` times; a share that still fails makes the request raise :class:`RolloutFailed`,
which carries the shares that did succeed so the caller can report exactly what was lost.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace

import ray

from piplay_ray import protocol
from piplay_ray.agent import run_agent
from piplay_ray.config import Config, FaultConfig, LoraConfig, RolloutConfig
from piplay_ray.console import say
from piplay_ray.engines import make_engine, named_tensors
from piplay_ray.engines.base import SamplingSpec
from piplay_ray.fault import RolloutFailed, actor_state, describe, is_actor_failure, wait_alive
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
        self.engine = make_engine(r.engine, model_path, r, dtype=dtype, seed=seed, lora=lora)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.spec = SamplingSpec(max_tokens=r.max_tokens_per_turn, temperature=r.temperature, top_p=r.top_p)
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

    async def receive_weights(self, ticket: dict) -> int:
        """Take part in a collective sync of this role's group; trajectories started later carry its version."""
        return await self.engine.areceive_weights(ticket)

    async def _one(self, prompt_ids: list[int], role: str, temperature: float | None = None) -> Trajectory:
        if self._inflight == 0:
            self._busy_since = time.perf_counter()
        self._inflight += 1
        try:
            r = self.rollout
            spec = self.spec if temperature is None else replace(self.spec, temperature=temperature)
            traj = await run_agent(self.engine, self.search, self.tokenizer, prompt_ids, spec,
                                   self.max_turns[role], role=role, version=self.engine.version,
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

    async def update_weights(self, version: int, weights) -> int:
        """Replace the engine's weights; trajectories started later carry `version`."""
        await self.engine.aupdate_weights(version, weights)
        return self.engine.version

    def metrics(self) -> dict:
        busy = self.stats["busy_s"]
        return {**self.stats, "inflight": self._inflight,
                "generated_tokens_per_s": self.stats["generated_tokens"] / busy if busy else 0.0}

    def shutdown(self) -> None:
        self.engine.shutdown()


RolloutWorker = ray.remote(RolloutWorkerImpl)


def _split(n_items: int, n_parts: int) -> list[range]:
    """Contiguous, nearly equal ranges (the first ones one longer), in order."""
    q, r = divmod(n_items, n_parts)
    bounds = list(itertools.accumulate([q + (i < r) for i in range(n_parts)], initial=0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def cpu_core_binding(r: RolloutConfig, local: bool, role: str, index: int) -> dict[str, str]:
    """On one CPU machine (`local`: run.mode = local), vLLM binds every engine to the same first core (it
    reserves the next one); spreading the engines over the cores lets the examiner and student engines run
    side by side."""
    if (not local or r.engine != "vllm" or r.num_gpus_per_worker
            or os.environ.get("VLLM_CPU_OMP_THREADS_BIND")):
        return {}
    slot = TRAINED.index(role) * r.workers_per_role + index
    return {"VLLM_CPU_OMP_THREADS_BIND": str(slot % (os.cpu_count() or 1))}


def lora_sync_form(role: str, forms: Sequence[tuple[str, str | None]]) -> tuple[str, str]:
    """Under learner.lora, from every worker's (weight form, why not adapters): what the pool takes, "adapter"
    only if every engine loads adapters, and the one start-up line that says so."""
    notes = [note or f"engine {i} takes full weights" for i, (form, note) in enumerate(forms) if form != "adapter"]
    if not notes:
        return "adapter", f"learner.lora: the {role} engines load each adapter version in place (adapter-only sync)"
    return "full", f"learner.lora: {notes[0]}; the {role} engines get merged full weights"


class RolloutPool:
    """`rollout.workers_per_role` workers holding one role's weights; requests are split across them.

    It reads the `rollout` and `fault` sections; `dtype`, `max_turns`, `seed`, `local` and `lora` are passed to
    it (`from_config` takes them from a whole config: model.dtype, `turn_limits`, run.seed, run.mode,
    learner.lora when its rank is set)."""

    def __init__(self, role: str, model_path: str, rollout: RolloutConfig, search_pool, fault: FaultConfig, *,
                 max_turns: Mapping[str, int], dtype: str = "auto", seed: int = 0, local: bool = True,
                 lora: LoraConfig | None = None, name: str | None = None):
        if role not in TRAINED:
            raise ValueError(f"role must be one of {TRAINED}, got {role!r}")
        r = rollout
        self.role, self.fault, self.lora = role, fault, lora
        self.workers = [
            RolloutWorker.options(num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker * r.tensor_parallel_size,
                                  max_restarts=fault.max_actor_restarts,
                                  name=f"{name}-{i}" if name else None,
                                  runtime_env={"env_vars": cpu_core_binding(r, local, role, i)})
            .remote(role, model_path, r, search_pool, max_turns=max_turns, dtype=dtype, seed=seed + 1000 * i,
                    lora=lora)
            for i in range(r.workers_per_role)
        ]
        self.version = 0
        self.names = [f"rollout-{role}-{i}" for i in range(len(self.workers))]
        self._latest: tuple[int, object] | None = None  # (version, weights arg) a restarted worker must get
        self._incarnation: list[str | None] = [None] * len(self.workers)
        self._restarts = [0] * len(self.workers)
        self._errors: list[str | None] = [None] * len(self.workers)
        self.retried = 0  # shares re-issued after a worker failure
        # weight_sync.transport=collective: brings every worker (a restarted one too) to the role's current
        # version through the role's group (set by the role's policy handle, evolution/policy.py);
        # None = object store pushes of `_latest`
        self.resync = None
        self._form: str | None = None  # weight_form(), asked once

    def weight_form(self) -> str:
        """What the learner must publish for this pool: "adapter" (learner.lora on and every engine loads
        adapters in place) or "full" (merged full weights). Asked once; under LoRA it says which, in one line."""
        if self._form is None:
            self._form = "full"
            if self.lora is not None:
                self._form, line = lora_sync_form(self.role, ray.get([w.weight_form.remote() for w in self.workers]))
                say(line)
        return self._form

    @classmethod
    def from_config(cls, role: str, model_path: str, cfg: Config, search_pool, name: str | None = None) -> RolloutPool:
        """The pool with what it reads of the whole config `cfg`."""
        return cls(role, model_path, cfg.rollout, search_pool, cfg.fault, max_turns=turn_limits(cfg),
                   dtype=cfg.model.dtype, seed=cfg.run.seed, local=cfg.run.mode == "local",
                   lora=cfg.learner.lora if cfg.learner.lora.rank else None, name=name)

    def wait_ready(self, timeout_s: float = 900) -> None:
        ray.get([w.ready.remote() for w in self.workers], timeout=timeout_s)

    # ------------------------------------------------------------------------------------------ faults

    def _note_error(self, i: int, e: BaseException) -> None:
        self._errors[i] = describe(e)

    async def _ensure_current(self, i: int) -> None:
        """Wait until worker i serves calls; if it restarted, give it the latest weights first."""
        w = self.workers[i]
        token, version = await wait_alive(lambda: w.identity.remote(), w)
        if self._incarnation[i] is not None and token != self._incarnation[i]:
            self._restarts[i] += 1
        self._incarnation[i] = token
        if self.resync is not None:
            if version != self.version:  # restarted: it rejoins the group at the next generation
                await self.resync()
        elif self._latest is not None and version != self._latest[0]:  # restarted, or a rollback
            await w.update_weights.remote(*self._latest)

    async def _call(self, share: int, method: str, *args):
        """Run `method(*args)` for one share, re-issuing it after a worker failure (same worker once it is
        back, or the next one), at most `fault.max_task_retries` times."""
        retries = self.fault.max_task_retries
        for attempt in range(retries + 1):
            i = (share + attempt) % len(self.workers)
            try:
                await self._ensure_current(i)
                return await getattr(self.workers[i], method).remote(*args)
            except Exception as e:
                if not is_actor_failure(e):
                    raise
                self._note_error(i, e)
                if attempt == retries:
                    raise
                self.retried += 1

    async def _fan_out(self, n_items: int, method: str, make_args) -> list:
        """Split items over the workers, run every share with retries; raise RolloutFailed on lost shares."""
        parts = [p for p in _split(n_items, len(self.workers)) if p]
        outs = await asyncio.gather(*[self._call(k, method, *make_args(part)) for k, part in enumerate(parts)],
                                    return_exceptions=True)
        partial, errors = [None] * n_items, []
        for part, out in zip(parts, outs, strict=True):
            if isinstance(out, BaseException):
                if not is_actor_failure(out):
                    raise out
                errors.append(describe(out))
                continue
            for i, item in zip(part, out, strict=True):
                partial[i] = item
        if errors:
            raise RolloutFailed(f"{len(errors)} of {len(parts)} shares lost after "
                                f"{self.fault.max_task_retries} retries: {errors[0]}", partial)
        return partial

    def health(self) -> dict[str, dict]:
        """{worker name: {alive, restarts, last_error}} from the pool's own observations and Ray's table."""
        out = {}
        for i, (name, w) in enumerate(zip(self.names, self.workers, strict=True)):
            state, restarts = actor_state(w)
            out[name] = {"alive": state in (None, "ALIVE"), "restarts": max(self._restarts[i], restarts or 0),
                         "last_error": self._errors[i]}
        return out

    # ------------------------------------------------------------------------------------------ requests

    async def student_rollouts(self, questions: Sequence[str], n: int,
                               temperature: float | None = None) -> list[list[Trajectory]]:
        """`n` trajectories for each question; a question's samples stay on one worker (same prefix)."""
        questions = list(questions)
        return await self._fan_out(len(questions), "student_rollouts",
                                   lambda part: ([questions[i] for i in part], n, temperature))

    async def examiner_rollouts(self, docs: Sequence[Doc], hops: Sequence[int]) -> list[Trajectory]:
        if len(docs) != len(hops):
            raise ValueError(f"{len(docs)} docs but {len(hops)} hop targets")
        return await self._fan_out(len(docs), "examiner_rollouts",
                                   lambda part: ([docs[i] for i in part], [hops[i] for i in part]))

    async def teacher_topk(self, jobs: Sequence[tuple[list[int], int]], k: int, teacher: tuple[int, list]) -> list:
        """Teacher top-K of every job, split over the workers (`RolloutWorkerImpl.teacher_topk`)."""
        jobs = list(jobs)
        return await self._fan_out(len(jobs), "teacher_topk", lambda part: ([jobs[i] for i in part], k, teacher))

    def _weights_arg(self, weights):
        """A learner bundle travels as is (it knows how to fetch its tensors); plain pairs go to the object
        store once, so every worker reads the same copy."""
        if hasattr(weights, "named_tensors"):
            return weights

        return ray.put(list(named_tensors(weights)))

    async def _push(self, i: int) -> None:
        """Bring worker i to the latest weights, retrying through a restart."""
        for attempt in range(self.fault.max_task_retries + 1):
            try:
                await self._ensure_current(i)
                return
            except Exception as e:
                if not is_actor_failure(e) or attempt == self.fault.max_task_retries:
                    raise
                self._note_error(i, e)

    async def aupdate_weights(self, version: int, weights) -> None:
        arg = self._weights_arg(weights)
        self._latest = (version, arg)
        await asyncio.gather(*[self._push(i) for i in range(len(self.workers))])
        self.version = version

    def update_weights(self, version: int, weights) -> None:
        """Push `weights` (pairs or a bundle with `named_tensors()`) to every worker; returns when all hold them."""
        arg = self._weights_arg(weights)
        self._latest = (version, arg)
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
