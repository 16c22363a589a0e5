"""Teacher: pure helpers against independent computations, then the real teacher on the tiny model."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
from helpers.teacher import make_task, teacher_config, trajectories_for

from piplay_ray.records import Doc, Hop, Task
from piplay_ray.teacher import context as T
from piplay_ray.teacher import ema

RAY_CPUS = 1  # the teacher actor below

# ------------------------------------------------------------------------------------------------ pure


def test_topk_from_logits_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 17, generator=g) * 2
    mask = [1, 0, 1, 1, 0]
    ids, lps, tails = T.topk_from_logits(logits, mask, k=4, tail=True)
    lp = logits.double().numpy()
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    for i, m in enumerate(mask):
        if not m:
            assert ids[i] == [] and lps[i] == [] and tails[i] == 0.0
            continue
        order = np.argsort(-lp[i])[:4]
        assert ids[i] == order.tolist()
        assert lps[i] == pytest.approx(lp[i][order].tolist(), abs=1e-5)
        assert math.exp(tails[i]) == pytest.approx(1 - np.exp(lp[i][order]).sum(), abs=1e-6)
    _, _, no_tail = T.topk_from_logits(logits, mask, k=4, tail=False)
    assert no_tail is None
    with pytest.raises(ValueError):
        T.topk_from_logits(logits, [1, 1], k=4, tail=False)


def test_tail_from_topk():
    lps = [math.log(0.5), math.log(0.3)]
    assert math.exp(T.tail_from_topk(lps)) == pytest.approx(0.2)
    assert T.tail_from_topk([0.0]) == T.LOG_FLOOR  # all the mass in the top-K
    assert T.tail_from_topk([math.log(0.7), math.log(0.4)]) == T.LOG_FLOOR  # inconsistent input: no NaN


def test_ema_closed_form_on_small_model():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    psi0 = [p.detach().clone() for p in teacher.parameters()]
    tau, steps = 0.05, 6
    thetas = [[torch.randn_like(p) for p in psi0] for _ in range(steps)]
    for th in thetas:
        ema.ema_(teacher.parameters(), th, tau)
    for j, p in enumerate(teacher.parameters()):
        # psi_n = (1 - tau)^n psi_0 + sum_i tau (1 - tau)^(n - i) theta_i  (i = 1..n)
        want = (1 - tau) ** steps * psi0[j].double()
        for i, th in enumerate(thetas, 1):
            want += tau * (1 - tau) ** (steps - i) * th[j].double()
        torch.testing.assert_close(p.detach().double(), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        ema.ema_(teacher.parameters(), thetas[0], 1.5)


# ------------------------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def hf(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return tok, model


def _reference(model, tok, task, traj, k, ctx=None):
    """A plain, unbatched transformers forward over (teacher context + response)."""
    ctx = T.context_ids(tok, task) if ctx is None else ctx
    ids = ctx + traj.response_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)[len(ctx) - 1 : len(ids) - 1]
    return lp.topk(k, -1)


def test_context_is_question_plus_qcp(hf):
    tok, _ = hf
    task = make_task(2)
    ctx = T.context_ids(tok, task)
    text = tok.decode(ctx)
    assert task.question in text and "topic 2 origin" in text and "The answer is" not in text
    assert "Source document: (Title 2) Some text about topic 2" in text
    answer_only = tok.decode(T.context_ids(tok, task, "answer"))
    assert "The answer is: Rome" in answer_only and "topic 2 origin" not in answer_only
    traj = trajectories_for(tok, [task])[0]
    seq, start = T.sequence(ctx, traj)
    assert seq[start:] == traj.response_ids and start == len(ctx)


@pytest.mark.parametrize("max_batch_tokens", [700, 60])
def test_teacher_scores_equal_plain_forward(hf, tiny_model, max_batch_tokens):
    """Groups of responses to one task share its context (computed once); 60 tokens a forward splits a
    group's responses over several forwards."""
    from piplay_ray.teacher.actor import TeacherImpl

    tok, model = hf
    tasks = [make_task(0), make_task(1), make_task(1), make_task(1), make_task(2), make_task(2)]
    trajs = trajectories_for(tok, tasks)
    teacher = TeacherImpl.from_config(tiny_model, teacher_config(), max_batch_tokens=max_batch_tokens)
    scores = asyncio.run(teacher.score(trajs, tasks))
    assert len(scores) == 6
    for task, traj, (ids, lps, tails) in zip(tasks, trajs, scores, strict=True):
        ref_lp, ref_ids = _reference(model, tok, task, traj, 8)
        assert len(ids) == len(traj.response_ids)
        for i, m in enumerate(traj.mask):
            if not m:
                assert ids[i] == [] and lps[i] == []
                continue
            assert ids[i] == ref_ids[i].tolist()
            assert lps[i] == pytest.approx(ref_lp[i].tolist(), abs=1e-4)
            assert math.exp(tails[i]) == pytest.approx(1 - ref_lp[i].exp().sum().item(), abs=1e-5)


def test_teacher_shortens_qcp_documents_to_fit(hf, tiny_model):
    """A context that would pass max_model_len is scored with evenly shortened QCP documents (counted), the
    student's response ids untouched; the scores equal a plain forward over that shortened context."""
    from piplay_ray.method import privileged
    from piplay_ray.teacher.actor import TeacherImpl

    tok, model = hf
    long_doc = Doc("L", "Long", " ".join(f"w{j}" for j in range(300)))
    task = Task(id="long", question="Which word comes last?", answer="w299", hops=2, source=long_doc,
                qcp=[Hop("more words", [Doc("M", "More", " ".join(f"v{j}" for j in range(300)))])])
    traj = trajectories_for(tok, [task])[0]
    full = T.context_ids(tok, task)
    limit = len(full) + len(traj.response_ids) - 200  # 200 tokens too many
    teacher = TeacherImpl.from_config(tiny_model, teacher_config(**{"rollout.max_model_len": limit}))
    (ids, lps, _), = (scores := asyncio.run(teacher.score([traj], [task], with_stats=True)))[0]
    assert scores[1] == {"shortened_contexts": 1, "unscored": 0}
    ctx, shortened = privileged.context_ids(tok, task, "qcp", None, limit - len(traj.response_ids))
    assert shortened and len(ctx) + len(traj.response_ids) <= limit
    text = tok.decode(ctx)
    assert "w0" in text and "v0" in text and "w299" not in text  # both documents keep their start
    ref_lp, ref_ids = _reference(model, tok, task, traj, 8, ctx)
    for i, m in enumerate(traj.mask):
        if m:
            assert ids[i] == ref_ids[i].tolist()
            assert lps[i] == pytest.approx(ref_lp[i].tolist(), abs=1e-4)


def test_teacher_ema_and_load_versioned(tiny_model, tmp_path):
    from piplay_ray.teacher.actor import TeacherImpl

    teacher = TeacherImpl.from_config(tiny_model, teacher_config(**{"teacher.ema_tau": 0.1}))
    psi0 = teacher.state()
    g = torch.Generator().manual_seed(0)
    thetas = [{n: t + torch.randn(t.shape, generator=g) * 0.01 for n, t in psi0.items()} for _ in range(3)]
    for v, th in enumerate(thetas, 1):
        assert asyncio.run(teacher.ema_update(v, list(th.items())))
    assert not asyncio.run(teacher.ema_update(3, thetas[0]))  # a replayed version is not applied twice
    assert teacher.get_version() == 3
    got, tau, n = teacher.state(), 0.1, 3
    for name, p0 in psi0.items():
        want = (1 - tau) ** n * p0.double()
        for i, th in enumerate(thetas, 1):
            want += tau * (1 - tau) ** (n - i) * th[name].double()
        torch.testing.assert_close(got[name].double(), want, atol=1e-6, rtol=1e-5)
    # the scoring model holds the EMA weights
    name = next(iter(psi0))
    assert torch.equal(dict(teacher.model.named_parameters())[name].detach(), got[name])

    class Bundle:
        def named_tensors(self):
            return iter(thetas[0].items())

    asyncio.run(teacher.load(7, Bundle()))
    assert teacher.get_version() == 7
    assert all(torch.equal(teacher.state()[n], t) for n, t in thetas[0].items())
    # checkpoint round trip
    folder = tmp_path / "teacher"
    asyncio.run(teacher.save(str(folder)))
    asyncio.run(teacher.load(8, thetas[1]))
    assert asyncio.run(teacher.load_checkpoint(str(folder))) == 7
    assert teacher.get_version() == 7 and all(torch.equal(teacher.state()[n], t) for n, t in thetas[0].items())
    with pytest.raises(ValueError, match="lacks"):
        asyncio.run(teacher.ema_update(8, list(thetas[0].items())[:3]))
    with pytest.raises(ValueError, match="unknown parameter"):
        asyncio.run(teacher.load(9, [("nope.weight", torch.zeros(1))]))


def test_teacher_ray_actor(ray_local, tiny_model):
    import ray
    from transformers import AutoTokenizer

    from piplay_ray.teacher.actor import create_teacher

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tasks = [make_task(1), make_task(2)]
    trajs = trajectories_for(tok, tasks)
    cfg = teacher_config(**{"teacher.tail_bucket": False})
    cfg.teacher.num_cpus = 1
    actor = create_teacher(tiny_model, cfg)
    scores = ray.get(actor.score.remote(trajs, tasks), timeout=300)
    assert [len(s[0]) for s in scores] == [len(t.response_ids) for t in trajs]
    assert all(s[2] is None for s in scores)
    state = ray.get(actor.state.remote())
    assert ray.get(actor.ema_update.remote(1, {n: t * 0 for n, t in state.items()}))
    new = ray.get(actor.state.remote())
    name = next(iter(state))
    torch.testing.assert_close(new[name], state[name] * (1 - cfg.teacher.ema_tau))
    assert ray.get(actor.get_version.remote()) == 1
