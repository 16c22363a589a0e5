"""One phase of the loop: W learner steps of one role, fed by a producer that runs ahead.

The producer makes the groups of learner step j (the role's step recipe, through `EvolutionLoop.step_groups`)
once the staleness rule allows it and puts them in the replay store; the learner samples them, trains, and
publishes the new weights, which the next producer round loads into the rollout pool. With in-flight updates
(`rollout.inflight_updates`) the new weights go into the engines at once, mid-trajectory, and the rounds of
consecutive steps overlap (up to `replay.max_staleness` + 1 of them; the engines serve the older round's turns
first, `SamplingSpec.priority`), so the engines stay full and neither side waits for the slowest trajectory;
rounds still reach the replay store in step order. The teacher's EMA step and the push into the engines then
run beside the next learner step, which waits for them only before it publishes (where they read only the
published bundle: `Policy.detached_after_step`), so the learner does not wait for a teacher still scoring.
"""

from __future__ import annotations

import asyncio
import sys
import time

from tqdm import tqdm

from piplay_ray.evolution.steps import mean
from piplay_ray.fault import describe, is_actor_failure
from piplay_ray.monitor.console import say
from piplay_ray.monitor.metrics import learner_metrics
from piplay_ray.rundir import step_eval_name


class LearnerFailure(RuntimeError):
    """A learner rank died during a step (or another actor failed past its retries); the loop rebuilds the
    learner group and rolls everything back to the newest checkpoint."""


class Phase:
    """`loop`: the EvolutionLoop whose state, policies, actors and run book the phase advances; with
    `eval_every` > 0 the loop evaluates after every that many learner steps of the role (a learning curve)."""

    def __init__(self, loop, role: str, eval_every: int = 0):
        self.loop, self.role, self.eval_every = loop, role, eval_every
        self.policy = loop.policies[role]
        self.after: asyncio.Task | None = None  # in flight: the last step's teacher EMA step and push
        self.mark = time.monotonic()  # the last learner step's end (or the phase's start)

    async def run(self, steps: int) -> None:
        """`steps` learner steps (fewer left when resumed mid-phase)."""
        st = self.loop.state
        first = self.policy.version - st.phase_steps  # the version this phase started at
        producer = asyncio.create_task(self.produce(self.policy.version, first + steps))
        bar = tqdm(total=steps, initial=st.phase_steps, desc=f"iter {st.iteration} {self.role}", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
        try:
            while st.phase_steps < steps and not self.loop.stopping:
                await self.learner_step(producer, bar)
            await self.settle()
        except Exception as e:  # a dead learner rank (or an actor past its retries): roll back, go on
            if is_actor_failure(e):
                raise LearnerFailure(describe(e)) from e
            raise
        finally:
            bar.close()
            for task in (producer, self.after):
                if task is not None:
                    task.cancel()
                    try:
                        await task
                    except (asyncio.CancelledError, Exception):
                        pass

    async def learner_step(self, producer: asyncio.Task, bar) -> None:
        loop, role, policy = self.loop, self.role, self.policy
        cfg, st, book, actors = loop.cfg, loop.state, loop.book, loop.actors
        groups = await self.sample(producer)
        exps = [e for g in groups for e in g]
        oldest = min(e.version for e in exps)
        stale = policy.version - oldest
        token_stale = [s for e in exps for s in e.token_staleness(policy.version)] or [stale]
        lam = policy.distill_weight(st.iteration)
        t = time.monotonic()
        fresh = cfg.learner.optimizer_restart == "iteration" and st.phase_steps == 0  # Dr. Zero: a run per phase
        m = await asyncio.to_thread(actors.learner.train_step, role, exps, lam, restart_optimizer=fresh)
        step_s = time.monotonic() - t
        st.versions[role] += 1
        st.phase_steps += 1
        st.global_step += 1
        await actors.replay.set_version.remote(role, policy.version)
        await self.settle()
        policy.publish()
        inflight = cfg.rollout.inflight_updates  # the push goes into the running engines now
        after = self.after_publish() if inflight else policy.after_step()
        if inflight and policy.detached_after_step:  # beside the next step
            self.after = asyncio.create_task(after)
        else:  # without in-flight updates the next round starts with the teacher of this step
            await after
        book.record_step(role, groups)
        book.log({**learner_metrics(m), "schedule/lambda": lam, "replay/staleness": stale,
                  "replay/token_staleness_mean": mean(token_stale), "replay/token_staleness_max": max(token_stale),
                  "learner/step_seconds": step_s, "learner/idle_frac": self.idle(step_s),
                  "learner/groups": len(groups), "learner/version": policy.version,
                  "learner/min_experience_version": oldest,
                  "learner/max_experience_version": max(e.version for e in exps)}, role)
        if m.get("skipped_step"):
            say(f"{role} learner step {st.global_step}: gradients not finite, the update was skipped "
                "(learner/skipped_step)")
        await book.after_step()
        if self.eval_every and policy.version % self.eval_every == 0:  # a learning curve (piplay experiment)
            await self.settle()
            await loop.evaluate(step_eval_name(policy.version))
        bar.update(1)
        bar.set_postfix(reward=f"{mean([e.reward for e in exps]):.3f}", staleness=stale)
        if cfg.checkpoint.every and st.global_step % cfg.checkpoint.every == 0:
            await self.settle()
            await book.checkpoint()

    async def after_publish(self) -> None:
        """The student's teacher EMA step (collective: with the pool's sync), then the pool's push."""
        await self.policy.after_step()
        await self.policy.sync_pool()

    def idle(self, step_s: float) -> float:
        """The share of the time since the last learner step's end that the learner did not train: waiting
        for its data, the teacher's EMA step and the push (in turn), evaluations, checkpoints."""
        now = time.monotonic()
        window, self.mark = now - self.mark, now
        return max(0.0, 1 - step_s / max(window, 1e-9))

    async def settle(self) -> None:
        """Wait for the last step's `after_publish` (raising its failure), if one runs."""
        after, self.after = self.after, None
        if after is not None:
            await after

    async def sample(self, producer: asyncio.Task) -> list:
        """The groups of the oldest learner step the replay store holds for the role: always a whole step."""
        while True:
            groups = await self.loop.actors.replay.sample.remote(self.role, 5.0)
            if groups:
                return groups
            if producer.done():
                producer.result()  # re-raise a producer failure here
                raise RuntimeError(f"the {self.role} producer stopped without filling the replay store")

    async def produce(self, first: int, last: int) -> None:
        """Fill the replay store for learner steps first..last-1, each started once the staleness rule allows;
        in flight, a round starts while earlier ones still run (at most max_staleness + 1 at once)."""
        loop, policy, bound = self.loop, self.policy, self.loop.cfg.replay.max_staleness
        overlap = bound + 1 if loop.cfg.rollout.inflight_updates else 1
        running: list[asyncio.Task] = []
        put_before = None  # the previous round's put: rounds reach the store in step order
        try:
            for j in range(first, last):
                if await loop.actors.replay.produced.remote(self.role, j):  # buffered, restored with a checkpoint
                    continue
                await _unless_failed(policy.wait_to_produce(j, bound, lambda: loop.stopping), running)
                while len(busy := [t for t in running if not t.done()]) >= overlap:
                    await _unless_failed(asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED), running)
                running = [t for t in running if not t.done()]
                if loop.stopping:
                    return
                put_before = asyncio.create_task(self.produce_round(j, put_before))
                running.append(put_before)
            await asyncio.gather(*running)
        finally:
            for t in running:
                t.cancel()

    async def produce_round(self, j: int, put_before: asyncio.Task | None) -> None:
        """The groups of learner step `j`, put in the replay store after the round before (made again if they
        went stale while generating)."""
        loop, policy, bound = self.loop, self.policy, self.loop.cfg.replay.max_staleness
        while not loop.stopping:
            await policy.wait_to_produce(j, bound, lambda: loop.stopping)
            await policy.sync_pool()
            t = time.monotonic()
            groups = await loop.step_groups(self.role, j)
            seconds = time.monotonic() - t  # the round's rollouts and scoring
            tokens = sum(sum(e.mask) for g in groups for e in g)
            if put_before is not None:
                await asyncio.shield(put_before)
            verdict = await loop.actors.replay.put.remote(groups)  # the whole step or none of it
            loop.book.log({"throughput/rollout_tokens_per_s": tokens / max(seconds, 1e-9),
                           "rollout/round_seconds": seconds,
                           "replay/refused": len(groups) if verdict == "stale" else 0}, self.role)
            if verdict in ("ok", "duplicate"):
                return  # else it went stale while generating: make this step's groups again


async def _unless_failed(aw, rounds: list[asyncio.Task]):
    """Await `aw` unless one of the running `rounds` fails first: then raise its error (a producer waiting on
    the staleness gate would otherwise wait for a learner step that never comes)."""
    task = asyncio.ensure_future(aw)
    try:
        while not task.done():
            await asyncio.wait([task, *[t for t in rounds if not t.done()]], return_when=asyncio.FIRST_COMPLETED)
            for t in rounds:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()
        return task.result()
    finally:
        task.cancel()
