"""The DeepSpeed learner group on CPU (gloo): real Ray actors, real DeepSpeed ZeRO-2, the tiny model.

DeepSpeed engines are expensive to start, so the module builds three groups once and shares them:
`one` (1 rank, examiner + student), `two` (2 ranks, student) and, in the resume test, a fresh group that
stands for a restarted run. Every numerical claim is checked against plain torch computed here.
"""

from __future__ import annotations

import random

import pytest
import ray
import torch
from helpers.learner import LR, MB_TOKENS, W_ATOL, experience_batch, learner_config, load_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from piplay_ray.learner import batching
from piplay_ray.learner import checkpoint as ck
from piplay_ray.learner.collate import collate
from piplay_ray.learner.learner import LearnerGroup
from piplay_ray.learner.losses import compute_loss
from piplay_ray.records import Experience

RAY_CPUS = 4


@pytest.fixture(scope="module")
def one(ray_local, tiny_model):
    g = LearnerGroup(learner_config(tiny_model), roles=("examiner", "student"))
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def two(ray_local, tiny_model):
    # gradient checkpointing changes memory, not math: the equivalence test below covers it too
    g = LearnerGroup(learner_config(tiny_model, **{"learner.world_size": 2, "learner.gradient_checkpointing": True}),
                     roles=("student",))
    yield g
    g.shutdown()


def _loss(model, exps, pad_id, cfg):
    batch = collate(exps, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return compute_loss(logits, batch, cfg.learner.loss, 0.0)[0].item()


def _reference_step(model, exps, pad_id, cfg, steps):
    """Plain torch: full-batch loss, clip, AdamW — what any world size and micro-batching must equal."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=cfg.learner.weight_decay)
    model.train()
    for _ in range(steps):
        batch = collate(exps, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        compute_loss(logits, batch, cfg.learner.loss, 0.0)[0].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.grad_clip)
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


def test_step_lowers_loss_and_touches_only_its_role(one, tiny_model):
    cfg, pad = one.cfg, AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    exps = experience_batch("student", seed=1)
    before = one.state_dict("examiner")
    m1 = one.train_step("student", exps)
    m2 = one.train_step("student", exps)
    # the reported loss is the full-batch loss before the update, recomputed here independently
    base = load_model(tiny_model)
    assert m1["loss"] == pytest.approx(_loss(base, exps, pad, cfg), rel=1e-4, abs=1e-6)
    after = _loss(load_model(tiny_model, one.state_dict("student")), exps, pad, cfg)
    assert m2["loss"] < m1["loss"] and after < m2["loss"]
    assert m1["micro_batches"] > 1 and m1["tokens"] == sum(sum(e.mask) for e in exps)
    assert m2["version"] == 2 and one.version("student") == 2 and one.version("examiner") == 0
    assert not any(ray.get([w.reference_loaded.remote(r) for w in one.workers for r in one.roles]))  # beta = 0
    assert m1["grad_norm"] > 0 and m1["tokens_per_s"] > 0 and m1["step_time_s"] > 0
    for n, t in one.state_dict("examiner").items():
        assert torch.equal(t, before[n]), n
    with pytest.raises(ValueError, match="role"):
        one.train_step("examiner", exps)  # student experiences sent to the examiner


def test_zero2_two_ranks_equal_one_rank_and_plain_torch(one, two, tiny_model):
    """`one`'s examiner and `two`'s student both start from the base model; same global batch, 2 steps.
    The prompts share 20 leading tokens: `one` runs them once a micro-batch, `two` (gradient checkpointing)
    runs every row whole."""
    cfg, pad = one.cfg, AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    exps = experience_batch("examiner", seed=2, n=7, head=20)
    for _ in range(2):
        m_one = one.train_step("examiner", exps)
        m_two = two.train_step("student", [Experience(**{**e.__dict__, "role": "student"}) for e in exps])
    unshared = len(batching.pack([e.num_tokens for e in exps], MB_TOKENS))
    assert m_one["micro_batches"] < unshared <= m_two["micro_batches"]  # the shared prefix packed tighter
    assert m_two["loss"] == pytest.approx(m_one["loss"], rel=1e-4)
    assert m_two["grad_norm"] == pytest.approx(m_one["grad_norm"], rel=1e-3)
    w1, w2 = one.state_dict("examiner"), two.state_dict("student")
    ref = _reference_step(load_model(tiny_model), exps, pad, cfg, steps=2)
    base = dict(load_model(tiny_model).named_parameters())
    for name, r in ref.items():
        moved = (r - base[name]).abs().max()
        assert moved > 0, name
        torch.testing.assert_close(w1[name], r, atol=W_ATOL, rtol=0)  # against plain torch
        # the two-rank learner with gradient checkpointing against the one-rank one
        torch.testing.assert_close(w2[name], w1[name], atol=W_ATOL, rtol=0)


def test_a_restarted_optimizer_steps_like_a_fresh_adam(one, tiny_model):
    """learner.optimizer_restart: a step with `restart_optimizer` starts from empty Adam moments (ZeRO-2's inner
    optimizer) whatever the role trained before, so it equals plain torch's first AdamW step from its weights."""
    cfg, pad = one.cfg, AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    exps = experience_batch("examiner", seed=5, n=4)
    one.train_step("examiner", exps)  # moments that a restart must drop
    start = one.state_dict("examiner")
    one.train_step("examiner", exps, restart_optimizer=True)
    steps = [float(v) for k, v in one._all("optimizer_state", "examiner")[0].items() if k.endswith(".step")]
    assert steps and set(steps) == {1.0}
    ref = _reference_step(load_model(tiny_model, start), exps, pad, cfg, steps=1)
    got = one.state_dict("examiner")
    for name, r in ref.items():
        torch.testing.assert_close(got[name], r, atol=W_ATOL, rtol=0)


def test_weights_bundle_matches_parameters(one, tiny_model):
    bundle = one.weights("student")
    sd = one.state_dict("student")
    got = dict(bundle.named_tensors())
    assert bundle.version == one.version("student") and bundle.meta["role"] == "student"
    hf_names = {n for n, _ in load_model(tiny_model).named_parameters()}
    assert set(got) == hf_names == set(sd)
    assert bundle.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
    for n, t in sd.items():
        assert torch.equal(got[n], t), n


def test_save_load_and_resume_are_exact(one, ray_local, tiny_model, tmp_path):
    cfg = one.cfg
    exps = [experience_batch("student", seed=10 + s) for s in range(4)]
    one.train_step("student", exps[0])
    v = one.version("student")
    saved = one.state_dict("student")
    # the driver's call: its state, plus other actors' state written into the same atomic folder
    path = one.save(ck.checkpoint_dir(tmp_path / "checkpoints", v), driver_state={"iteration": 0, "step": v},
                    extra={"teacher": lambda d: (d / "ema.txt").write_text("teacher")})
    assert ck.latest_checkpoint(tmp_path) == path and ck.is_complete(path)
    assert (path / "teacher" / "ema.txt").read_text() == "teacher"
    # HF export loads in transformers with the same logits as the learner's weights; tokenizer has a template
    ids = torch.tensor([[5, 77, 300, 1200, 9]])
    hf = AutoModelForCausalLM.from_pretrained(path / "student", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, load_model(tiny_model, saved)(ids).logits)
    assert AutoTokenizer.from_pretrained(path / "student").chat_template
    # the uninterrupted run continues two steps
    opt_saved = ray.get(one.workers[0].optimizer_state.remote("student"))
    for e in exps[1:3]:
        one.train_step("student", e)
    final, final_opt = one.state_dict("student"), ray.get(one.workers[0].optimizer_state.remote("student"))
    # a fresh group (a restarted run) resumes from the newest checkpoint and runs the same two steps
    fresh = LearnerGroup(cfg, roles=("examiner", "student"))
    try:
        state = fresh.resume(tmp_path)
        assert state == {"iteration": 0, "step": v}
        assert fresh.version("student") == v and fresh.version("examiner") == one.version("examiner")
        for n, t in fresh.state_dict("student").items():
            assert torch.equal(t, saved[n]), n
        resumed_opt = ray.get(fresh.workers[0].optimizer_state.remote("student"))
        assert resumed_opt.keys() == opt_saved.keys()
        for k in opt_saved:
            assert torch.equal(torch.as_tensor(resumed_opt[k]), torch.as_tensor(opt_saved[k])), k
        for e in exps[1:3]:
            m = fresh.train_step("student", e)
        assert m["version"] == v + 2 == one.version("student")
        for n, t in fresh.state_dict("student").items():
            assert torch.equal(t, final[n]), n
        end_opt = ray.get(fresh.workers[0].optimizer_state.remote("student"))
        for k in final_opt:
            assert torch.equal(torch.as_tensor(end_opt[k]), torch.as_tensor(final_opt[k])), k
        # retention: keep the newest two
        fresh.checkpoint(tmp_path, step=v + 2)
        fresh.checkpoint(tmp_path, step=v + 3, keep=2)
        assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [v + 2, v + 3]
    finally:
        fresh.shutdown()


def test_distillation_term_reaches_the_learner_loss(one, tiny_model):
    cfg, pad = one.cfg, AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    rng = random.Random(5)
    exps = experience_batch("student", seed=5)
    for e in exps:
        e.teacher_ids = [[rng.randrange(5, 2000) for _ in range(4)] if m else [] for m in e.mask]
        e.teacher_logprobs = [sorted((-rng.uniform(0.5, 4) for _ in range(4)), reverse=True) if m else []
                              for m in e.mask]
    model = load_model(tiny_model, one.state_dict("student"))
    batch = collate(exps, pad)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want, want_m = compute_loss(logits, batch, cfg.learner.loss, 0.5)
    plain, _ = compute_loss(logits, batch, cfg.learner.loss, 0.0)
    m = one.train_step("student", exps, lam=0.5)
    assert m["loss"] == pytest.approx(want.item(), rel=1e-4) and abs(want.item() - plain.item()) > 1e-3
    assert m["distill_kl"] == pytest.approx(want_m["distill_kl"], rel=1e-4)
    assert m["skipped_step"] == 0


def test_a_step_with_non_finite_gradients_is_reported_skipped(one):
    """DeepSpeed leaves the weights as they were when a gradient is not finite; the step says so."""
    before = one.state_dict("student")
    exps = experience_batch("student", seed=6)
    exps[0].advantage = float("nan")
    m = one.train_step("student", exps)
    assert m["skipped_step"] == 1
    for n, t in one.state_dict("student").items():
        assert torch.equal(t, before[n]), n
    assert one.train_step("student", experience_batch("student", seed=7))["skipped_step"] == 0


def test_two_rank_zero2_save_load_is_exact(two, tmp_path):
    """Each rank saves and restores its own optimizer partition."""
    exps = experience_batch("student", seed=21, n=6)
    path = two.save(tmp_path / "ck", driver_state={"note": "x"})
    v = two.version("student")
    opts = [ray.get(w.optimizer_state.remote("student")) for w in two.workers]
    two.train_step("student", exps)
    after = two.state_dict("student")
    assert two.load(path) == {"note": "x"} and two.version("student") == v
    for w, saved in zip(two.workers, opts, strict=True):
        now = ray.get(w.optimizer_state.remote("student"))
        assert now.keys() == saved.keys()
        assert all(torch.equal(torch.as_tensor(now[k]), torch.as_tensor(saved[k])) for k in saved)
    two.train_step("student", exps)
    for n, t in two.state_dict("student").items():
        assert torch.equal(t, after[n]), n
    # a malformed record is refused by every rank before any collective (no rank is left waiting)
    bad = experience_batch("student", seed=22, n=6)
    bad[5].mask = bad[5].mask[:-1]
    with pytest.raises(ray.exceptions.RayTaskError, match="same length"):
        two.train_step("student", bad)
    assert two.train_step("student", exps)["version"] == v + 2
