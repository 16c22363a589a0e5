"""The EMA teacher under learner.lora: an EMA of the adapter (closed form, checkpoint exact), the same teacher
served as a second adapter on the student's engine (`teacher.backend: shared`) scoring as a separate teacher
does, and the config and layout of the shared teacher. Tiny model, transformers, no Ray."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from helpers.teacher import make_task, trajectories_for

from piplay_ray.cluster import layout as L
from piplay_ray.config import ConfigError, load_config
from piplay_ray.teacher import adapter as teacher_adapter

LORA = ["learner.lora.rank=4", "learner.lora.alpha=8"]
TAU, N = 0.1, 4


def _cfg(*over: str):
    return load_config("configs/tiny.yaml", ["teacher.top_k=8", "model.dtype=float32", "rollout.engine=transformers",
                                             f"teacher.ema_tau={TAU}", *LORA, *over])


def _adapters(names_shapes: dict, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n random adapters (A and B both nonzero) with the given names and shapes."""
    g = torch.Generator().manual_seed(seed)
    return [{k: 0.2 * torch.randn(s, generator=g) for k, s in names_shapes.items()} for _ in range(n)]


def _closed_form(adapters: list[dict], tau: float) -> dict[str, torch.Tensor]:
    """a_0 loaded, then a_1..a_n blended: d^n a_0 + sum_k (1 - d) d^(n-k) a_k with d = 1 - tau, in float64."""
    d, n = 1 - tau, len(adapters) - 1
    return {name: d ** n * adapters[0][name].double()
            + sum((1 - d) * d ** (n - k) * adapters[k][name].double() for k in range(1, n + 1))
            for name in adapters[0]}


@pytest.fixture(scope="module")
def separate(tiny_model):
    from piplay_ray.teacher.actor import TeacherImpl

    return TeacherImpl.from_config(tiny_model, _cfg("teacher.backend=transformers"))


class InProcessPool:
    """The student pool's `teacher_topk` on one real rollout worker, without Ray."""

    def __init__(self, worker):
        self.worker = worker

    async def teacher_topk(self, jobs, k, teacher):
        return await self.worker.teacher_topk(jobs, k, teacher)


@pytest.fixture(scope="module")
def shared(tiny_model):
    from transformers import AutoTokenizer

    from piplay_ray.actors.rollout import RolloutWorkerImpl, turn_limits
    from piplay_ray.teacher.shared import SharedTeacher

    cfg = _cfg("teacher.backend=shared")
    worker = RolloutWorkerImpl("student", tiny_model, cfg.rollout, None, max_turns=turn_limits(cfg), dtype="float32",
                               lora=cfg.learner.lora)
    return SharedTeacher(InProcessPool(worker), AutoTokenizer.from_pretrained(tiny_model), cfg.teacher,
                         cfg.learner.lora, teacher_adapter.initial(tiny_model, cfg.learner.lora), max_len=cfg.rollout.max_model_len,
                         put=lambda x: x)


@pytest.mark.parametrize("which", ["separate", "shared"])
def test_adapter_ema_equals_the_closed_form_and_resumes_exactly(which, request, tmp_path):
    teacher = request.getfixturevalue(which)
    start = teacher.state()
    assert start and all(".lora_A." in n or ".lora_B." in n for n in start)  # the EMA is over the adapter only
    assert all(not t.any() for t in start.values())  # zero before it is loaded: the base model
    adapters = _adapters({n: t.shape for n, t in start.items()}, N + 1)
    asyncio.run(teacher.load(0, adapters[0]))  # the student's adapter when the student phase starts
    for v in range(1, N + 1):
        assert asyncio.run(teacher.ema_update(v, list(adapters[v].items())))
    assert not asyncio.run(teacher.ema_update(N, adapters[0]))  # a replayed version is not applied twice
    want, got = _closed_form(adapters, TAU), teacher.state()
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], atol=1e-6, rtol=1e-6)
    if which == "separate":  # the scoring model serves the EMA adapter
        served = {n: p.detach() for n, p in teacher_adapter.served(teacher.model).items()}
        assert all(torch.equal(served[n], got[n]) for n in got)
    # a checkpoint holds the EMA adapter; a resume restores it bit for bit, with its version
    asyncio.run(teacher.save(str(tmp_path)))
    asyncio.run(teacher.load(N + 1, adapters[1]))
    assert asyncio.run(teacher.load_checkpoint(str(tmp_path))) == N
    assert all(torch.equal(teacher.state()[n], got[n]) for n in got) and teacher.version == N
    with pytest.raises(ValueError, match="unknown parameter"):  # full weights are not what it takes
        asyncio.run(teacher.ema_update(N + 1, [("model.embed_tokens.weight", torch.zeros(2048, 128))]))


def test_shared_engine_scores_equal_a_separate_teacher(separate, shared, tiny_model):
    """Both teachers hold the same EMA adapter; the student's engine scores with it as a second adapter."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tasks = [make_task(i) for i in range(3)]
    trajs = trajectories_for(tok, tasks)
    adapter = _adapters({n: t.shape for n, t in separate.state().items()}, 1, seed=7)[0]
    for teacher in (separate, shared):
        asyncio.run(teacher.load(11, adapter))
    a, stats_a = asyncio.run(separate.score(trajs, tasks, with_stats=True))
    b, stats_b = asyncio.run(shared.score(trajs, tasks, with_stats=True))
    assert stats_a == stats_b
    engine = shared.pool.worker.engine
    for traj, (ids_a, lps_a, tails_a), (ids_b, lps_b, tails_b) in zip(trajs, a, b, strict=True):
        for i, m in enumerate(traj.mask):
            if not m:
                assert ids_a[i] == ids_b[i] == [] and tails_b[i] == 0.0
                continue
            assert ids_a[i] == ids_b[i] and len(ids_b[i]) == 8
            assert lps_b[i] == pytest.approx(lps_a[i], abs=1e-4)
            assert math.exp(tails_b[i]) == pytest.approx(math.exp(tails_a[i]), abs=1e-5)
    # the adapter mattered (the base model scores otherwise), and the student's own adapter is untouched
    ids, start = traj.prompt_ids + traj.response_ids, len(traj.prompt_ids)
    with_teacher = asyncio.run(engine.teacher_topk(ids, start, 8))
    own = asyncio.run(engine.prompt_topk(ids, start, 8))
    base = engine.logprobs_of(ids, start)
    moved = max(abs(x - y) for r1, r2 in zip(with_teacher.logprobs, own.logprobs, strict=True)
                for x, y in zip(r1, r2, strict=True))
    assert moved > 1e-2
    torch.testing.assert_close(torch.tensor(own.logprobs), base.topk(8, -1).values, atol=1e-6, rtol=0)
    assert engine.teacher_version == 11


def test_shared_teacher_config_and_layout():
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["teacher.backend=shared"])  # LoRA off
    assert "teacher.backend=shared" in str(e.value) and "learner.lora.rank" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["teacher.backend=remote"])
    assert "`teacher.backend`: got 'remote'; allowed values: vllm, transformers, shared" in str(e.value)
    with pytest.raises(ConfigError, match="model.teacher"):
        load_config("configs/tiny.yaml", [*LORA, "teacher.backend=shared", "model.teacher=/elsewhere"])
    over = [*LORA, "teacher.num_gpus=1", "teacher.num_cpus=2", "rollout.num_gpus_per_worker=1"]
    own = L.layout(load_config("configs/tiny.yaml", over))
    shared = L.layout(load_config("configs/tiny.yaml", [*over, "teacher.backend=shared"]))
    assert (own.teacher_gpus, own.teacher_cpus, shared.teacher_gpus, shared.teacher_cpus) == (1, 2, 0, 0)
    assert shared.total_gpus == own.total_gpus - 1 and shared.placements == (1.0, 1.0)  # the two engines


def test_merged_ema_adapter_equals_peft_merge(tiny_model):
    """For a teacher engine that cannot serve LoRA: base + EMA adapter merged equals PEFT's own merge."""
    from transformers import AutoModelForCausalLM

    from piplay_ray.learner import lora

    lc = _cfg().learner.lora
    base = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters()}
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), lc)
    ema = _adapters({n: p.shape for n, p in teacher_adapter.served(model).items()}, 1, seed=3)[0]
    with torch.no_grad():
        for name, p in teacher_adapter.served(model).items():
            p.copy_(ema[name])
    want = model.merge_and_unload().state_dict()
    got = dict(teacher_adapter.merged(base, ema, lc, torch.float32))
    assert set(got) == set(base) and any(not torch.equal(got[n], base[n]) for n in got)
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], atol=1e-6, rtol=1e-5)
