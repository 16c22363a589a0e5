"""The rollout pool: one role's rollout workers (actors/rollout.py), requests spread over them, weights pushed to all.

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
from collections.abc import Mapping, Sequence

import ray

from piplay_ray.actors.rollout import RolloutWorker, turn_limits
from piplay_ray.cluster.placement import resources
from piplay_ray.config import Config, FaultConfig, LoraConfig, RolloutConfig
from piplay_ray.engines import named_tensors
from piplay_ray.fault import RolloutFailed, actor_state, describe, is_actor_failure, wait_alive
from piplay_ray.monitor.console import say
from piplay_ray.records import Doc, Trajectory
from piplay_ray.roles import TRAINED


def _split(n_items: int, n_parts: int) -> list[range]:
    """Contiguous, nearly equal ranges (the first ones one longer), in order."""
    q, r = divmod(n_items, n_parts)
    bounds = list(itertools.accumulate([q + (i < r) for i in range(n_parts)], initial=0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def cpu_core_binding(r: RolloutConfig, local: bool, role: str, index: int) -> dict[str, str]:
    """On one CPU machine (`local`: run.mode = local), vLLM binds every engine to the same first core (it
    reserves the next one); spreading the engines over the cores lets the examiner and student engines run
    side by side. A role given more cores (`rollout.local_engine_cores`) binds a range of them: an engine that
    runs alone (the evaluation, or every phase of a synchronous loop, `replay.max_staleness` 0) uses them all."""
    if (not local or r.engine != "vllm" or r.num_gpus_per_worker
            or os.environ.get("VLLM_CPU_OMP_THREADS_BIND")):
        return {}
    ncpu, n = os.cpu_count() or 1, r.local_engine_cores.get(role, 1)
    start = (TRAINED.index(role) * r.workers_per_role + index) % ncpu
    first, last = (start, start + n - 1) if start + n <= ncpu else (0, min(n, ncpu) - 1)
    return {"VLLM_CPU_OMP_THREADS_BIND": str(first) if first == last else f"{first}-{last}"}


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
                 lora: LoraConfig | None = None, name: str | None = None, placement=None):
        if role not in TRAINED:
            raise ValueError(f"role must be one of {TRAINED}, got {role!r}")
        r = rollout
        self.role, self.fault, self.lora = role, fault, lora
        default = {"num_cpus": r.num_cpus_per_worker, "num_gpus": r.num_gpus_per_worker * r.tensor_parallel_size}
        self.workers = [
            RolloutWorker.options(**resources(placement, f"rollout-{role}-{i}", default),
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
    def from_config(cls, role: str, model_path: str, cfg: Config, search_pool, name: str | None = None,
                    placement=None) -> RolloutPool:
        """The pool with what it reads of the whole config `cfg`."""
        return cls(role, model_path, cfg.rollout, search_pool, cfg.fault, max_turns=turn_limits(cfg),
                   dtype=cfg.model.dtype, seed=cfg.run.seed, local=cfg.run.mode == "local",
                   lora=cfg.learner.lora if cfg.learner.lora.rank else None, name=name, placement=placement)

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

    async def student_rollouts(self, questions: Sequence[str], n: int, temperature: float | None = None,
                               closed_book: bool = False, priority: int = 0) -> list[list[Trajectory]]:
        """`n` trajectories for each question (`closed_book`: answered without search, in one turn); a
        question's samples stay on one worker (same prefix). `priority`: `SamplingSpec.priority`."""
        questions = list(questions)
        return await self._fan_out(len(questions), "student_rollouts",
                                   lambda part: ([questions[i] for i in part], n, temperature, closed_book, priority))

    async def examiner_rollouts(self, docs: Sequence[Doc], hops: Sequence[int], priority: int = 0) -> list[Trajectory]:
        if len(docs) != len(hops):
            raise ValueError(f"{len(docs)} docs but {len(hops)} hop targets")
        return await self._fan_out(len(docs), "examiner_rollouts",
                                   lambda part: ([docs[i] for i in part], [hops[i] for i in part], priority))

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
