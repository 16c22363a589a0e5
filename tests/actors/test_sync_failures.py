"""A weight sync whose member stalls or dies mid-sync, through the code a run uses (GroupSync, the collective
and ipc transports, their receivers, gloo and shared memory on CPU) with real Ray actors: every member raises within the group's timeout,
the stalled or dead member is restarted, the retry on a new generation succeeds and every member holds the
sender's exact weights. And an engine that died inside a live actor (vLLM's EngineDeadError) restarts it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from types import SimpleNamespace

import pytest
import ray
import torch
from helpers.engine_death import EngineDeadError, Worker

from piplay_ray.fault import is_actor_failure, wait_alive
from piplay_ray.weight_sync import make_transport
from piplay_ray.weight_sync.coordinator import GroupSync

RAY_CPUS = 4
TIMEOUT_S = 4.0
BUCKET = 16 << 20  # larger than a socket's buffers: a sender to a stalled peer blocks instead of finishing


def _named() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(f"layer{i}.weight", torch.randn(BUCKET // 4, generator=g)) for i in range(6)]


@ray.remote(num_cpus=0, max_restarts=1, max_task_retries=0, max_concurrency=4)
class Member:
    """A receiver that, in its first incarnation only, stalls or exits after taking `after` tensors."""

    def __init__(self, marker: str, behaviour: str, after: int = 2):
        first = not os.path.exists(marker)
        open(marker, "a").close()
        self.marker, self.behaviour, self.after = marker, (behaviour if first else "ok"), after
        self.rx, self.incarnation, self.version, self.got, self.raised = None, uuid.uuid4().hex, 0, {}, []

    def sync_member(self):
        return self.incarnation, 1, self.version

    def receive_weights(self, ticket: dict, mode: str = "skip") -> int:
        from piplay_ray.weight_sync import receiver_for

        got = {}
        self.rx = receiver_for(ticket, "cpu", self.rx)
        try:
            for i, (name, t) in enumerate(self.rx.receive(ticket)):
                if i == self.after and self.behaviour in ("stall", "die"):
                    with open(self.marker, "w") as f:  # when the fault began (the clock is the host's)
                        f.write(repr(time.monotonic()))
                    if self.behaviour == "die":
                        os._exit(1)
                    time.sleep(600)
                got[name] = t.clone()
        except Exception as e:
            self.raised.append((type(e).__name__, time.monotonic()))
            raise
        self.got, self.version = got, self.rx.version
        return self.version

    def state(self):
        return self.incarnation, self.version, self.got, self.raised


class Learner:
    """The learner's rank 0 as GroupSync sees it, publishing with a pushing transport in this process."""

    def __init__(self, named, kind):
        self.named, self.tx, self.outcomes = named, make_transport(kind, bucket_mb=BUCKET >> 20), []

    def open_sync_group(self, role, world, generation, transport=None):
        return dataclasses.asdict(self.tx.open("127.0.0.1", world, generation, TIMEOUT_S))

    def weights(self, role, kind, form="full"):
        try:
            receipt = self.tx.publish(5, iter(self.named))
        except Exception as e:
            self.outcomes.append((type(e).__name__, time.monotonic()))
            raise
        self.outcomes.append(("ok", time.monotonic()))
        return receipt


@pytest.mark.parametrize("kind", ["collective", "ipc"])
@pytest.mark.parametrize("behaviour", ["stall", "die"])
def test_a_member_that_stalls_or_dies_mid_sync_is_restarted_and_the_retry_delivers(ray_local, tmp_path, behaviour,
                                                                                    kind):
    named = _named()
    members = [Member.remote(str(tmp_path / f"m{i}"), behaviour if i == 1 else "ok") for i in range(3)]
    before = ray.get(members[1].state.remote())[0]
    learner = Learner(named, kind)
    sync = GroupSync("student", learner, SimpleNamespace(workers=members, version=0), retries=2, transport=kind)
    t0 = time.monotonic()
    out = asyncio.run(sync.sync(5))
    elapsed = time.monotonic() - t0

    assert out["version"] == 5 and out["generation"] == 2  # the retry met on a new generation
    assert [o for o, _ in learner.outcomes] == ["SyncError", "ok"]
    # the sender and the healthy receivers raised within the timeout of the fault (plus scheduling slack), not
    # at Ray's or NCCL's much later deadlines; the whole sync with its retry took a few timeouts, not a hang
    fault_at = float((tmp_path / "m1").read_text())
    assert learner.outcomes[0][1] - fault_at < TIMEOUT_S + 3
    states = ray.get([m.state.remote() for m in members])
    for i in (0, 2):
        (name, at), = states[i][3]
        assert name == "SyncError" and at - fault_at < TIMEOUT_S + 3
    assert elapsed < 4 * TIMEOUT_S + 30
    assert states[1][0] != before  # the stalled or dead member was restarted and rejoined
    for _, version, got, _ in states:
        assert version == 5 and list(got) == [n for n, _ in named]
        assert all(torch.equal(got[n], t) for n, t in named)


def test_an_engine_that_died_inside_a_live_actor_restarts_it(ray_local):
    worker = Worker.remote()
    first = ray.get(worker.identity.remote())
    with pytest.raises(ValueError):  # any other error is the caller's: the actor lives on
        ray.get(worker.bad_request.remote())
    assert ray.get(worker.identity.remote()) == first
    with pytest.raises(Exception) as err:
        ray.get(worker.generate.remote(False))
    assert is_actor_failure(err.value)  # the caller retries it like any other actor death
    again = asyncio.run(wait_alive(lambda: worker.identity.remote(), worker, timeout_s=120))
    assert again != first
    assert ray.get(worker.generate.remote(True)) == "tokens"
    assert is_actor_failure(EngineDeadError("in this process"))
