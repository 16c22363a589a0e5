"""In-flight weight updates (`rollout.inflight_updates`): an update lands between two tokens of a running
request, which continues on the new weights; every token records the version that made it, and its logprob
is that version's (the truncated importance weights use each token's own). The transformers engine exactly
(recompute: the continuation is the new weights' own), vLLM on CPU (pause, load, resume) against the
transformers reference, and a receiver killed mid-update while another is generating: the sync recovers as
any sync does and the running request ends on the new version."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
import ray
import torch

from piplay_ray.engines import SamplingSpec
from piplay_ray.engines import transformers_engine as TE
from piplay_ray.engines.transformers_engine import TransformersEngine
from piplay_ray.weight_sync import make_transport
from piplay_ray.weight_sync.coordinator import GroupSync

TOL = 2e-3  # vLLM's float32 CPU kernels against transformers' (test_engines.py)


def new_weights(model_path: str, seed: int = 1) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    sd = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).state_dict()
    return {n: t + 0.2 * t.std() * torch.randn(t.shape, generator=g) for n, t in sd.items()}


def token_logprobs(engine: TransformersEngine, prompt: list[int], response: list[int]) -> list[float]:
    rows = engine.logprobs_of(prompt + response, len(prompt))
    return [float(rows[i, t]) for i, t in enumerate(response)]


@pytest.fixture(scope="module")
def refs(tiny_model):
    """Transformers engines holding the old and the new weights: what each token's logprob must be."""
    old = TransformersEngine(tiny_model, dtype="float32", num_threads=1)
    new = TransformersEngine(tiny_model, dtype="float32", num_threads=1)
    new.update_weights(7, new_weights(tiny_model))
    prompt = old.tokenizer("The river that flows through Vienna is", add_special_tokens=False)["input_ids"]
    return SimpleNamespace(old=old, new=new, weights=new_weights(tiny_model), prompt=prompt)


@pytest.mark.parametrize("kv", ["recompute", "keep"])
def test_transformers_engine_takes_weights_between_two_tokens(tiny_model, refs, monkeypatch, kv):
    engine = TransformersEngine(tiny_model, dtype="float32", num_threads=1, inflight=True, kv=kv)
    k, calls, sample = 6, [], TE.sample_token

    def sample_then_update(*args):  # runs outside the step lock, as a sync from another thread would
        calls.append(1)
        if len(calls) == k:
            engine.update_weights(7, refs.weights)
        return sample(*args)

    monkeypatch.setattr(TE, "sample_token", sample_then_update)
    gen = engine.generate_sync(refs.prompt, SamplingSpec(max_tokens=20, temperature=0.0))
    n = len(gen.token_ids)
    assert n > k + 3 and gen.versions == [0] * k + [7] * (n - k)
    old = token_logprobs(refs.old, refs.prompt, gen.token_ids)
    torch.testing.assert_close(gen.logprobs[:k], old[:k], rtol=0, atol=1e-5)
    if kv == "recompute":  # every later token is the new weights' own, given the tokens before it
        new = token_logprobs(refs.new, refs.prompt, gen.token_ids)
        torch.testing.assert_close(gen.logprobs[k:], new[k:], rtol=0, atol=1e-5)
        cont = refs.new.generate_sync(refs.prompt + gen.token_ids[:k], SamplingSpec(max_tokens=n - k, temperature=0.0))
        assert cont.token_ids == gen.token_ids[k:]


@pytest.mark.parametrize("kv", ["recompute", "keep"])
def test_vllm_engine_takes_weights_mid_request(tiny_model, refs, kv):
    from piplay_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model, dtype="float32", max_model_len=512, max_num_seqs=4, kv_cache_gib=1,
                        inflight=True, kv=kv)
    try:
        async def scenario():
            gen = asyncio.ensure_future(engine.generate(refs.prompt, SamplingSpec(max_tokens=400, temperature=0.0)))
            await asyncio.sleep(0.3)
            assert not gen.done(), "the request ended before the update: make it longer"
            await engine.aupdate_weights(7, refs.weights)
            return await gen

        gen = asyncio.run(scenario())
    finally:
        engine.shutdown()
    n, k = len(gen.token_ids), gen.versions.index(7)
    assert 0 < k < n and gen.versions == [0] * k + [7] * (n - k)
    old = token_logprobs(refs.old, refs.prompt, gen.token_ids)
    assert max(abs(a - b) for a, b in zip(gen.logprobs[:k], old[:k], strict=True)) < TOL
    if kv == "recompute":  # vLLM recomputed the request's KV under the new weights: exact again
        new = token_logprobs(refs.new, refs.prompt, gen.token_ids)
        assert max(abs(a - b) for a, b in zip(gen.logprobs[k:], new[k:], strict=True)) < TOL


def test_vllm_engine_serves_an_older_steps_turns_first(tiny_model, refs):
    """In flight, the rounds of consecutive learner steps share an engine: of the turns waiting for a slot, the
    older step's go first (`SamplingSpec.priority`), though they arrived later (first come, first served would
    finish `young` first), so the round the learner needs next is not held up by the one after it."""
    from piplay_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model, dtype="float32", max_model_len=512, max_num_seqs=1, kv_cache_gib=1,
                        inflight=True)
    try:
        async def scenario():
            done = []

            async def turn(name, tokens, priority):
                await engine.generate(refs.prompt, SamplingSpec(max_tokens=tokens, temperature=0.0,
                                                                priority=priority))
                done.append(name)

            busy = asyncio.ensure_future(turn("busy", 300, 5))  # holds the only slot
            await asyncio.sleep(0.3)
            young = asyncio.ensure_future(turn("young", 8, 5))
            await asyncio.sleep(0.1)
            old = asyncio.ensure_future(turn("old", 8, 4))
            await asyncio.sleep(0.1)
            assert not busy.done(), "the first request ended before the others waited: make it longer"
            await asyncio.gather(busy, young, old)
            return done

        assert asyncio.run(scenario()) == ["busy", "old", "young"]
    finally:
        engine.shutdown()


@ray.remote(num_cpus=0, max_restarts=1, max_task_retries=0, max_concurrency=4)
class Worker:
    """A rollout worker stand-in: an in-flight transformers engine that generates in a thread while syncs
    arrive; in its first incarnation, with `die`, it exits after the first tensor of a sync."""

    def __init__(self, model: str, marker: str, die: bool):
        first = not os.path.exists(marker)
        open(marker, "a").close()
        self.die, self.incarnation = die and first, uuid.uuid4().hex
        self.engine = TransformersEngine(model, dtype="float32", num_threads=1, inflight=True)
        self.out = None

    def sync_member(self):
        return self.incarnation, 1, self.engine.version

    def receive_weights(self, ticket: dict, mode: str = "skip") -> int:
        if self.die:
            from piplay_ray.weight_sync import receiver_for

            for i, _ in enumerate(receiver_for(ticket, "cpu").receive(ticket)):
                if i == 1:
                    os._exit(1)
        return self.engine.receive_weights(ticket)

    def start(self, prompt: list[int], tokens: int, token_s: float) -> None:
        sample = TE.sample_token
        TE.sample_token = lambda *a: (time.sleep(token_s), sample(*a))[1]  # a long trajectory, in this process

        def run():
            self.out = self.engine.generate_sync(prompt, SamplingSpec(max_tokens=tokens, temperature=0.0))

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def result(self):
        self.thread.join()
        return self.out.versions

    def state(self):
        return self.incarnation, self.engine.version, {n: t.clone() for n, t in self.engine.model.state_dict().items()}


class Learner:
    """Rank 0 as GroupSync sees it: publishes `named` as version 5 over the collective transport."""

    def __init__(self, named):
        self.named, self.tx = named, make_transport("collective", bucket_mb=1)

    def open_sync_group(self, role, world, generation, transport=None):
        return dataclasses.asdict(self.tx.open("127.0.0.1", world, generation, 4.0))

    def weights(self, role, kind, form="full"):
        return self.tx.publish(5, iter(self.named))


def test_a_receiver_killed_mid_update_recovers_while_another_generates(ray_local, tiny_model, refs, tmp_path):
    workers = [Worker.remote(tiny_model, str(tmp_path / f"w{i}"), die=i == 1) for i in range(2)]
    before = ray.get(workers[1].sync_member.remote())[0]
    ray.get(workers[0].start.remote(refs.prompt, 400, 0.05))  # ~20 s: longer than a failed sync and its retry
    time.sleep(0.5)  # it is generating when the sync comes
    sync = GroupSync("student", Learner(list(refs.weights.items())), SimpleNamespace(workers=workers, version=0),
                     retries=2)
    out = asyncio.run(sync.sync(5))
    assert (out["version"], out["generation"]) == (5, 2), out  # the first try failed with the dead member
    versions = ray.get(workers[0].result.remote())
    assert versions[0] == 0 and versions[-1] == 5 and versions == sorted(versions)  # mid-request, in order
    for w in workers:
        _, version, state = ray.get(w.state.remote())
        assert version == 5 and all(torch.equal(state[n], t) for n, t in refs.weights.items())
    assert ray.get(workers[1].sync_member.remote())[0] != before  # restarted, rejoined, current
