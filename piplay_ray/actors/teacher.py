"""The teacher actor: an EMA copy of the student that scores the student's tokens with the QCP in view.

It keeps the EMA master weights psi in float32 (so tau * (theta - psi) steps are not rounded away) and a
scoring backend: a transformers model (batched, left-padded forward; only the response logits are
materialised) or a vLLM engine (`prompt_topk`, i.e. prompt logprobs). Every update carries the student's
version; an EMA step for a version the teacher already holds is skipped, so a retried call cannot apply
the same step twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from piplay_ray import privileged
from piplay_ray import teacher as T
from piplay_ray.config import Config, RolloutConfig, TeacherConfig
from piplay_ray.engines import make_engine, named_tensors
from piplay_ray.fault import describe, is_actor_failure, wait_alive
from piplay_ray.learner.weight_sync.collective import Receiver
from piplay_ray.records import Task, Trajectory

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherImpl:
    """Plain class behind the `Teacher` actor (usable in-process in tests and scripts).

    It reads the `teacher` section; of `rollout`, the model length and (vLLM backend) the engine settings;
    `dtype` is the model's (`model.dtype`) and `seed` the run's (`from_config` takes them from a whole config).
    """

    def __init__(self, model_path: str, teacher: TeacherConfig, rollout: RolloutConfig, *, dtype: str = "auto",
                 seed: int = 0, max_batch_tokens: int = 4096):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tcfg, self.seed = teacher, seed
        self.max_batch_tokens = max_batch_tokens
        self.max_len = rollout.max_model_len
        self.version = 0
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.device = torch.device("cuda" if self.tcfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        serve = self.serve_dtype = _DTYPES.get(dtype, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        # canonical name of every parameter, tied aliases (e.g. lm_head.weight -> embed_tokens.weight) included
        canon: dict[int, str] = {}
        self.alias: dict[str, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.alias[name] = canon.setdefault(id(p), name)
        self.engine = None
        if self.tcfg.backend == "vllm":
            self.master = {n: p.detach() for n, p in model.named_parameters()}
            self.model = None
            del model
            # the teacher's own parallelism and memory share, not the rollout engines' (config.TeacherConfig)
            self.engine = make_engine("vllm", model_path, rollout, dtype=dtype, seed=seed,
                                      max_logprobs=max(64, self.tcfg.top_k),
                                      tensor_parallel_size=self.tcfg.tensor_parallel_size,
                                      gpu_memory_utilization=self.tcfg.gpu_memory_utilization)
        else:
            self.model = model.to(self.device, serve).eval()
            self._aliased = serve == torch.float32 and self.device.type == "cpu"
            if self._aliased:
                self.master = {n: p.data for n, p in self.model.named_parameters()}  # the model is the master
            else:
                self.master = {n: p.detach().float().cpu() for n, p in self.model.named_parameters()}
        self._lock = asyncio.Lock()
        self._receiver = None  # its place in the student's weight-sync group (collective transport)
        self.incarnation = uuid.uuid4().hex  # new on every (re)start of this actor

    @classmethod
    def from_config(cls, model_path: str, cfg: Config, **kw) -> TeacherImpl:
        """The teacher with what it reads of the whole config `cfg` (`teacher_args`)."""
        return cls(model_path, **teacher_args(cfg), **kw)

    # ------------------------------------------------------------------------------------- weights

    def _blend(self, weights: Any, tau: float) -> int:
        """psi <- (1 - tau) psi + tau theta over every parameter; theta streamed as (name, tensor)."""
        done: set[str] = set()
        for name, tensor in named_tensors(weights):
            key = self.alias.get(name)
            if key is None:
                raise ValueError(f"teacher: unknown parameter {name!r} (not in the teacher's model)")
            if key in done:
                continue  # a tied alias of a parameter already blended
            T.ema_([self.master[key]], [tensor.detach()], tau)
            done.add(key)
        missing = set(self.master) - done
        if missing:
            raise ValueError(f"teacher: the update lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        return len(done)

    async def _push(self, version: int) -> None:
        if self.engine is not None:  # the serving dtype goes to the engine's file, never the fp32 masters
            await self.engine.aupdate_weights(version, ((n, t.to(self.serve_dtype)) for n, t in self.master.items()))
        elif not self._aliased:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.copy_(self.master[name].to(p.device, p.dtype))
        self.version = version

    async def ema_update(self, version: int, weights: Any) -> bool:
        """Blend the student's weights of `version` in with tau = teacher.ema_tau; False if already applied."""
        async with self._lock:
            if version <= self.version:
                log.warning("teacher: EMA for version %d skipped (holding %d)", version, self.version)
                return False
            self._blend(weights, self.tcfg.ema_tau)
            await self._push(version)
            return True

    async def load(self, version: int, weights: Any) -> None:
        """psi <- theta exactly (teacher.init = iteration: the driver calls this at each iteration start)."""
        async with self._lock:
            self._blend(weights, 1.0)
            await self._push(version)

    def get_version(self) -> int:
        return self.version

    def sync_member(self) -> tuple[str, int, int]:
        """(incarnation, ranks in the student's weight-sync group, EMA version) for the coordinator."""
        return self.incarnation, 1, self.version

    async def receive_weights(self, ticket: dict, mode: str = "skip") -> bool:
        """Take part in a collective sync of the student's group: `ema` blends the broadcast in (skipped,
        i.e. only drained, for a version already held), `load` sets psi to it, `skip` only drains it."""

        if mode not in ("ema", "load", "skip"):
            raise ValueError(f"receive_weights mode must be ema, load or skip, got {mode!r}")
        if self._receiver is None:
            self._receiver = Receiver(self.device)
        rx = self._receiver
        if mode == "skip":
            await asyncio.to_thread(rx.drain, ticket)
            return False
        version = int(ticket["version"])
        async with self._lock:
            if mode == "ema" and version <= self.version:
                log.warning("teacher: EMA for version %d skipped (holding %d)", version, self.version)
                await asyncio.to_thread(rx.drain, ticket)
                return False
            await asyncio.to_thread(self._blend, rx.receive(ticket), 1.0 if mode == "load" else self.tcfg.ema_tau)
            await self._push(version)
            return True

    def save(self, folder: str) -> str:
        """Write the EMA master weights and version to `folder/teacher.safetensors` (checkpoints)."""
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / "teacher.safetensors"
        save_file({n: t.detach().cpu().contiguous() for n, t in self.master.items()}, str(path),
                  metadata={"version": str(self.version)})
        return str(path)

    async def load_checkpoint(self, folder: str) -> int:
        """Restore what `save` wrote; returns the restored version."""
        from safetensors import safe_open

        path = Path(folder) / "teacher.safetensors"
        with safe_open(str(path), framework="pt") as f:
            version = int((f.metadata() or {}).get("version", 0))
            weights = [(n, f.get_tensor(n)) for n in f.keys()]
        await self.load(version, weights)
        return version

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the EMA master weights (tests, checkpoints)."""
        return {n: t.clone() for n, t in self.master.items()}

    # ------------------------------------------------------------------------------------- scoring

    async def score(self, trajectories: Sequence[Trajectory], tasks: Sequence[Task],
                    with_stats: bool = False) -> list[T.Scores] | tuple[list[T.Scores], dict[str, int]]:
        """Teacher top-K (ids, logprobs, tail) per response position of each trajectory, given its task.

        Rows are empty where mask is 0. A task's context is fitted to the longest of its responses here:
        when context + response would pass the model length, its QCP documents are shortened evenly
        (counted as `shortened_contexts`); a response that does not fit even then gets empty rows (no
        distillation for it, counted as `unscored`) rather than an error. `with_stats` also returns the counts.
        """
        if len(trajectories) != len(tasks):
            raise ValueError(f"score: {len(trajectories)} trajectories but {len(tasks)} tasks")
        k, tail = self.tcfg.top_k, self.tcfg.tail_bucket
        longest: dict[str, int] = {}
        for traj, task in zip(trajectories, tasks, strict=True):
            longest[task.id] = max(longest.get(task.id, 0), len(traj.response_ids))
        contexts: dict[str, list[int] | None] = {}
        stats = {"shortened_contexts": 0, "unscored": 0}
        jobs, out = [], [T.empty_scores(len(t.response_ids), tail) for t in trajectories]
        for i, (traj, task) in enumerate(zip(trajectories, tasks, strict=True)):
            if task.id not in contexts:
                ctx, shortened = privileged.context_ids(self.tokenizer, task, self.tcfg.privileged,
                                                        self.tcfg.doc_token_budget, self.max_len - longest[task.id],
                                                        self.seed)
                contexts[task.id] = ctx
                stats["shortened_contexts"] += shortened
            if not any(traj.mask) or contexts[task.id] is None:
                stats["unscored"] += contexts[task.id] is None and self.tcfg.privileged != "none"
                continue
            ids, start = T.sequence(contexts[task.id], traj)
            jobs.append((i, ids, start, traj.mask))
        async with self._lock:
            if self.engine is not None:
                results = await asyncio.gather(*(self._score_vllm(ids, start, mask, k, tail)
                                                 for _, ids, start, mask in jobs))
            else:
                results = await asyncio.to_thread(self._score_hf, [(ids, start, mask) for _, ids, start, mask in jobs],
                                                  k, tail)
        for (i, *_), res in zip(jobs, results, strict=True):
            out[i] = res
        return (out, stats) if with_stats else out

    async def _score_vllm(self, ids: list[int], start: int, mask: Sequence[int], k: int, tail: bool) -> T.Scores:
        top = await self.engine.prompt_topk(ids, start, k)
        rows_ids = [list(r) if m else [] for r, m in zip(top.ids, mask, strict=True)]
        rows_lps = [list(r) if m else [] for r, m in zip(top.logprobs, mask, strict=True)]
        tails = [T.tail_from_topk(r) if m else 0.0 for r, m in zip(top.logprobs, mask, strict=True)] if tail else None
        return rows_ids, rows_lps, tails

    @torch.inference_mode()
    def _score_hf(self, seqs: list[tuple[list[int], int, Sequence[int]]], k: int, tail: bool) -> list[T.Scores]:
        """Batched forward over left-padded sequences, keeping only the logits that predict response tokens."""
        results: list[T.Scores | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
        batch: list[int] = []

        def flush():
            if not batch:
                return
            L = max(len(seqs[i][0]) for i in batch)
            R = max(len(seqs[i][0]) - seqs[i][1] for i in batch)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = torch.full((len(batch), L), pad, dtype=torch.long)
            attn = torch.zeros((len(batch), L), dtype=torch.long)
            for row, i in enumerate(batch):
                s = seqs[i][0]
                ids[row, L - len(s):] = torch.tensor(s)
                attn[row, L - len(s):] = 1
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                position_ids=pos.to(self.device), logits_to_keep=R + 1).logits
            for row, i in enumerate(batch):
                s, start, mask = seqs[i]
                r = len(s) - start
                # the last kept position predicts past the sequence; response token j is predicted just before it
                results[i] = T.topk_from_logits(logits[row, -(r + 1):-1], mask, k, tail)
            batch.clear()

        for i in order:
            L = len(seqs[i][0])
            if batch and (len(batch) + 1) * L > self.max_batch_tokens:
                flush()
            batch.append(i)
        flush()
        return results  # type: ignore[return-value]

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


Teacher = ray.remote(TeacherImpl)


def teacher_args(cfg: Config) -> dict:
    """What a teacher reads of the whole config, as its constructor's keyword arguments."""
    return {"teacher": cfg.teacher, "rollout": cfg.rollout, "dtype": cfg.model.dtype, "seed": cfg.run.seed}


def create_teacher(model_path: str, cfg: Config):
    """Start the `Teacher` actor with the resources of the `teacher` config section, restarted up to
    `fault.max_actor_restarts` times."""
    return Teacher.options(num_cpus=cfg.teacher.num_cpus, num_gpus=cfg.teacher.num_gpus,
                           max_restarts=cfg.fault.max_actor_restarts, max_concurrency=64).remote(model_path,
                                                                                                 **teacher_args(cfg))


class TeacherClient:
    """Driver-side handle on the `Teacher` actor that survives its restarts.

    A restarted teacher comes back with the base model's weights, i.e. without its EMA. The client keeps a
    snapshot of the EMA (an object-store reference to `state()`, owned by the driver, so it outlives the
    actor) taken after every update, checks the teacher's version before and after each call, and on a
    mismatch or an actor error restores the snapshot with `load(version, snapshot)` and retries the call, up
    to `fault.max_task_retries` times. Without a snapshot it falls back to `fallback_folder()` (the latest
    checkpoint's teacher folder), if any. Scoring runs beside EMA updates; the client's state (version,
    snapshot) changes and is read only under one lock, so a score never restores an EMA an update is replacing.
    """

    def __init__(self, actor, retries: int = 3, fallback_folder=None):
        self.actor, self.retries, self.fallback_folder = actor, retries, fallback_folder
        self.version = 0  # the EMA version the teacher must hold
        self._snapshot = None  # (version, ObjectRef of state())
        self.restarts = 0
        self.last_error: str | None = None
        self._lock = asyncio.Lock()

    async def _take_snapshot(self) -> bool:
        """Snapshot the EMA of `self.version`; False when the teacher restarted meanwhile (EMA lost)."""

        ref = self.actor.state.remote()
        try:
            await asyncio.to_thread(ray.wait, [ref], fetch_local=False)  # materialised, not copied here
            held = await self.actor.get_version.remote()  # runs after state(): same caller, in order
        except Exception as e:
            if not is_actor_failure(e):
                raise
            return False
        if held != self.version:
            return False
        self._snapshot = (self.version, ref)
        return True

    async def _update(self, method: str, *args) -> int:
        """An EMA-changing call, then a verified snapshot; if the teacher restarted in between, start over
        from the previous snapshot (the call is deterministic given it)."""
        async with self._lock:
            base = (self.version, self._snapshot)
            for _ in range(self.retries + 1):
                self.version, self._snapshot = base
                out = await self._call(method, *args, locked=True)
                self.version = out if method == "load_checkpoint" else args[0]
                if await self._take_snapshot():
                    return self.version
                self.restarts += 1
            raise RuntimeError(f"teacher: {method} kept failing; the teacher restarts faster than it updates")

    async def _restore(self) -> None:
        held = await wait_alive(lambda: self.actor.get_version.remote(), self.actor)
        if held == self.version:
            return
        self.restarts += 1
        if self._snapshot is not None and self._snapshot[0] == self.version:
            await self.actor.load.remote(self.version, self._snapshot[1])
        elif self.version == 0:
            return  # the base weights are the version-0 teacher
        else:
            folder = self.fallback_folder() if self.fallback_folder else None
            if folder is None:
                raise RuntimeError(f"teacher restarted and its EMA of version {self.version} cannot be recovered")
            self.version = await self.actor.load_checkpoint.remote(str(folder))
            log.warning("teacher: EMA restored from %s (version %d)", folder, self.version)

    async def _call(self, method: str, *args, locked: bool = False):
        """`method` on a teacher that holds `self.version`; a score or a save is checked afterwards to have
        run on that EMA (a restart meanwhile would have put the base weights there). `locked`: the caller
        holds the lock (an update)."""
        guard = contextlib.nullcontext() if locked else self._lock
        for attempt in range(self.retries + 1):
            try:
                async with guard:
                    await self._restore()
                out = await getattr(self.actor, method).remote(*args)
                if method in ("score", "save"):
                    async with guard:  # an update in flight finishes first: it changes the version legitimately
                        if await self.actor.get_version.remote() != self.version:
                            raise ray.exceptions.ActorUnavailableError(f"teacher restarted during {method}", None)
                return out
            except Exception as e:
                if not is_actor_failure(e) or attempt == self.retries:
                    raise
                self.last_error = describe(e)

    async def score(self, trajectories, tasks, with_stats: bool = False):
        return await self._call("score", list(trajectories), list(tasks), with_stats)

    async def ema_update(self, version: int, weights) -> None:
        await self._update("ema_update", version, weights)

    async def updated(self, version: int) -> None:
        """The teacher took `version` in a collective sync the driver ran: record it and snapshot the EMA."""
        async with self._lock:
            base = self.version
            self.version = version
            if not await self._take_snapshot():  # it restarted meanwhile: the next call restores the old snapshot
                self.version = base
                self.restarts += 1

    async def load(self, version: int, weights) -> None:
        await self._update("load", version, weights)

    async def load_checkpoint(self, folder: str) -> int:
        return await self._update("load_checkpoint", folder)

    async def save(self, folder: str) -> str:
        return await self._call("save", folder)

    async def ensure(self) -> int:
        """Make sure the teacher holds the EMA of `self.version` (restoring it if it restarted)."""
        return await self._call("get_version")

    def reset(self) -> None:
        """Forget the EMA (the teacher was sent back to its initial weights)."""
        self.version, self._snapshot = 0, None
