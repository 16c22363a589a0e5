"""The vLLM teacher backend (prompt logprobs) agrees with the transformers backend, before and after EMA steps
(the EMA streamed into the engine's workers, no file).

One vLLM teacher (tiny model, float32) is shared by the module.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from helpers.teacher import make_task, teacher_config, trajectories_for

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # a second vLLM engine start: ~1-2 min on the shared CPU machine
TOL = 2e-3  # float32 CPU kernels differ in summation order


@pytest.fixture(scope="module")
def teachers(tiny_model):
    from piplay_ray.teacher.actor import TeacherImpl

    vt = TeacherImpl.from_config(tiny_model, teacher_config("vllm", **{"rollout.kv_cache_gib": 1, "rollout.max_num_seqs": 8}))
    ht = TeacherImpl.from_config(tiny_model, teacher_config("transformers"))
    yield vt, ht
    vt.shutdown()


def _agree(a, b, mask):
    for (ids_a, lps_a, tail_a), (ids_b, lps_b, tail_b) in zip(a, b, strict=True):
        for i, m in enumerate(mask):
            if not m:
                assert ids_a[i] == ids_b[i] == []
                continue
            assert len(ids_a[i]) == len(ids_b[i]) == 8
            da, db = dict(zip(ids_a[i], lps_a[i], strict=True)), dict(zip(ids_b[i], lps_b[i], strict=True))
            # the same top-K set up to near-ties at the K-th place; shared ids agree in logprob
            shared = set(da) & set(db)
            assert len(shared) >= len(da) - 1
            assert ids_a[i][0] == ids_b[i][0] or abs(lps_a[i][0] - lps_a[i][1]) < TOL
            for t in shared:
                assert da[t] == pytest.approx(db[t], abs=TOL)
            assert math.exp(tail_a[i]) == pytest.approx(math.exp(tail_b[i]), abs=TOL)


def _score_both(vt, ht, tok):
    tasks = [make_task(i) for i in range(3)]
    trajs = trajectories_for(tok, tasks)
    got = [asyncio.run(t.score(trajs, tasks)) for t in (vt, ht)]
    for traj, a, b in zip(trajs, *got, strict=True):
        _agree([a], [b], traj.mask)


def test_vllm_and_transformers_backends_agree(teachers):
    vt, ht = teachers
    _score_both(vt, ht, ht.tokenizer)


def test_backends_agree_after_ema(teachers, monkeypatch):
    vt, ht = teachers

    def no_file(*_):
        raise AssertionError("the teacher's EMA went to its engine through a shared-memory file")

    monkeypatch.setattr("piplay_ray.engines.vllm_engine.write_shared", no_file)  # it streams into the workers
    g = torch.Generator().manual_seed(0)
    base = ht.state()
    theta = {n: t + torch.randn(t.shape, generator=g) * 0.05 for n, t in base.items()}
    for t in (vt, ht):
        assert asyncio.run(t.ema_update(1, theta))
    for name in list(base)[:3]:
        torch.testing.assert_close(vt.state()[name], ht.state()[name])
    _score_both(vt, ht, ht.tokenizer)
