"""Pure parts of the learner, without Ray or DeepSpeed: rank environment, warm-up schedule, hidden-state
forward, and the loss's hand-computed pieces (truncated IS weight, per-sequence distillation)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from piplay_ray.cluster.devices import NOSET
from piplay_ray.config import LearnerConfig, LossConfig, load_config
from piplay_ray.learner import losses
from piplay_ray.learner.rank import LearnerWorkerImpl, rank_args
from piplay_ray.learner.rank_env import rank_env
from piplay_ray.learner.schedule import lr_factor, make_scheduler


def test_rank_env_one_visible_device_is_local_rank_0():
    """Ray's default: the rank's own GPU is the only visible one, so rank 3 on its node uses device 0."""
    env, dev = rank_env(3, 4, 3, 4, "10.0.0.1", 29500, ["3"], {"CUDA_VISIBLE_DEVICES": "3"})
    assert dev == 0 and env["LOCAL_RANK"] == "0"
    assert env | {} == {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "RANK": "3", "WORLD_SIZE": "4",
                        "LOCAL_RANK": "0", "LOCAL_SIZE": "4", "CROSS_RANK": "0", "CROSS_SIZE": "1"}


def test_rank_env_noset_mode_uses_the_real_index():
    env, dev = rank_env(1, 2, 1, 2, "h", 1, [5], {NOSET: "1"})
    assert dev == 5 and env["LOCAL_RANK"] == "5"
    env, dev = rank_env(1, 2, 1, 2, "h", 1, ["6"], {NOSET: "1", "CUDA_VISIBLE_DEVICES": "4,6,7"})
    assert dev == 1 and env["LOCAL_RANK"] == "1"  # GPU 6 is the second visible device


def test_rank_env_cpu_keeps_the_node_rank():
    env, dev = rank_env(2, 3, 2, 3, "h", 1, [], {NOSET: "1"})
    assert dev is None and env["LOCAL_RANK"] == "2" and env["RANK"] == "2"


def test_a_rank_takes_only_what_it_reads_of_the_config():
    """The group breaks the whole config down for its ranks; what crosses Ray is JSON and names its parts."""
    cfg = load_config("configs/tiny.yaml", ["model.base=/m/base", "model.student=/m/warm", "model.teacher=/m/t",
                                            "run.seed=7", "learner.lr=0.5", "weight_sync.bucket_mb=3"])
    args = rank_args(cfg, ("student", "examiner"))
    assert json.loads(json.dumps(args)) == args and set(args) == {"models", "learner", "weight_sync", "seed"}
    w = LearnerWorkerImpl(1, 2, **args)
    assert w.models == {"student": "/m/warm", "examiner": "/m/base"} and w.roles == ("student", "examiner")
    assert (w.seed, w.learner.lr, w.weight_sync.bucket_mb, w.rank, w.world_size) == (7, 0.5, 3, 1, 2)
    assert w.learner == cfg.learner and w.weight_sync == cfg.weight_sync


def test_linear_warmup_and_dr_zero_clip_default():
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0) == 1.0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make_scheduler(opt, 4)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    from piplay_ray.learner.role_engine import ds_config

    assert LearnerConfig().grad_clip == 0.1 and ds_config(LearnerConfig(), 1, False)["gradient_clipping"] == 0.1


def test_an_optimizer_restart_drops_the_moments_and_starts_the_warm_up_again():
    """learner.optimizer_restart = iteration: after 3 steps of a 4-step warm-up, a restart gives back an empty
    Adam state and lr x 1/4; the next step then equals a fresh AdamW's first step from the same weights."""
    from types import SimpleNamespace

    from piplay_ray.learner.role_engine import RoleEngine

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)
    sched = make_scheduler(opt, 4)
    for _ in range(3):
        p.grad = torch.tensor([0.5, 0.25])
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and opt.state[p]["step"] == 3
    RoleEngine.restart_optimizer(SimpleNamespace(engine=SimpleNamespace(optimizer=opt), scheduler=sched))
    assert not opt.state and opt.param_groups[0]["lr"] == pytest.approx(0.025)
    start = p.detach().clone()
    p.grad = torch.tensor([-1.0, 4.0])
    opt.step()
    # Adam's first step by hand: m = (1-b1) g, v = (1-b2) g^2, bias-corrected m/sqrt(v) = sign(g), so each
    # weight moves by lr_0 = 0.025 against its gradient (eps aside)
    torch.testing.assert_close(p.detach(), start - 0.025 * torch.tensor([-1.0, 1.0]), atol=1e-6, rtol=0)


def _one_seq_batch(lens, V, advantage=0.0, engine_lp=None, teacher=None):
    """Prompt of 1 token then `n` response tokens per sequence; all response tokens trained."""
    B, T = len(lens), max(lens) + 1
    mask = torch.zeros(B, T - 1)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T, dtype=torch.long),
             "mask": mask, "advantages": torch.full((B, T - 1), advantage),
             "old_logprobs": (engine_lp if engine_lp is not None else torch.full((B, T - 1), -math.log(V))) * mask}
    if teacher is not None:
        batch["teacher_ids"] = torch.arange(V).expand(B, T - 1, V).clone()
        batch["teacher_logprobs"] = teacher
        batch["teacher_mask"] = mask.clone()
    return batch


def test_truncated_is_weight_by_hand():
    w = losses.truncated_is_weight(torch.tensor([-1.0, -2.0, -0.5, -0.2]), torch.tensor([-1.5, -1.0, -0.5, -1.5]), 2.0)
    assert w.tolist() == pytest.approx([math.exp(0.5), math.exp(-1.0), 1.0, 2.0])
    # in the loss: a uniform student over V=4 (log pi = -log 4); the engine saw -log4+0.5 and -log4-1
    V, A = 4, 1.5
    engine = torch.tensor([[-math.log(V) + 0.5, -math.log(V) - 1.0]])
    b = _one_seq_batch([2], V, advantage=A, engine_lp=engine)
    logits = torch.zeros(1, 3, V, requires_grad=True)
    loss, m = losses.compute_loss(logits, b, LossConfig(is_cap=2.0), lam=0.0)
    w1, w2 = math.exp(-0.5), 2.0  # e^{+1} = 2.72 is truncated at the cap
    assert loss.item() == pytest.approx(-(w1 * A + w2 * A) / 2)
    assert m["is_weight"] == pytest.approx((w1 + w2) / 2) and m["is_truncated_frac"] == pytest.approx(0.5)
    assert m["logp_mismatch_mean"] == pytest.approx(0.75) and m["logp_mismatch_max"] == pytest.approx(1.0)
    # gradient of -w A log pi(target=0) / n on uniform logits: -w A (onehot - 1/V) / 2
    loss.backward()
    want = torch.tensor([1.0, 0, 0, 0]) - 1 / V
    torch.testing.assert_close(logits.grad[0, 0], -w1 * A * want / 2)
    torch.testing.assert_close(logits.grad[0, 1], -w2 * A * want / 2)
    # switched off: the plain ratio against the engine's logprobs (e^-0.5, e^1), PPO-clipped at 1 + 0.2
    loss_off, m_off = losses.compute_loss(logits, b, LossConfig(is_correction="none"), lam=0.0)
    assert loss_off.item() == pytest.approx(-(min(math.exp(-0.5), 0.8) * A + min(math.exp(1.0), 1.2) * A) / 2,
                                            rel=1e-5)
    assert m_off["is_weight"] == 1.0


def test_per_sequence_distillation_by_hand():
    """Uniform student over V=3; KL(u || t) per token; a 1-token and a 3-token sequence."""
    V = 3
    t1, t2 = [0.5, 0.25, 0.25], [0.8, 0.1, 0.1]
    kl = [sum(1 / 3 * math.log((1 / 3) / q) for q in t) for t in (t1, t2)]
    teacher = torch.log(torch.tensor([[t1, t1, t1], [t2, t2, t2]]))
    b = _one_seq_batch([1, 3], V, teacher=teacher)
    logits = torch.zeros(2, 4, V)
    seq, m = losses.compute_loss(logits, b, LossConfig(distill_norm="sequence"), lam=1.0)
    assert seq.item() == pytest.approx((kl[0] / 1 + 3 * kl[1] / 3) / 2, rel=1e-5)
    tok, _ = losses.compute_loss(logits, b, LossConfig(distill_norm="aggregation"), lam=1.0)
    assert tok.item() == pytest.approx((kl[0] + 3 * kl[1]) / 4, rel=1e-5)
    assert m["distill_kl"] == pytest.approx((kl[0] + 3 * kl[1]) / 4, rel=1e-5)  # the metric stays a token mean
    assert LossConfig().distill_norm == "sequence"


def test_hidden_forward_matches_the_models_logits(tiny_model):
    from transformers import AutoModelForCausalLM

    from piplay_ray.learner.hidden import HiddenForward

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    fwd = HiddenForward(model)
    ids = torch.tensor([[5, 17, 99, 4, 250, 7], [8, 9, 10, 11, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long() | torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    with torch.no_grad():
        hidden = fwd(model, batch)
        full = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(fwd.head(hidden), full, atol=1e-5, rtol=1e-5)


def test_shared_prefix_forward_equals_the_full_forward(tiny_model):
    """Rows that open with the same 20 tokens (then differ, with right padding): the prefix runs once and
    the hidden states and every parameter's gradient equal those of the plain full forward."""
    from transformers import AutoModelForCausalLM

    from piplay_ray.learner import batching
    from piplay_ray.learner.hidden import HiddenForward

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).train()
    V = model.config.vocab_size
    prefix, lens = torch.randint(1, V, (20,)), [31, 27, 24]
    ids, am = torch.zeros(3, 31, dtype=torch.long), torch.zeros(3, 31, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, :20], ids[b, 20:n], am[b, :n] = prefix, torch.randint(1, V, (n - 20,)), 1
    ids[1, 20] = ids[0, 20]  # two rows share one token more: the common prefix stays 20
    rows = [ids[b, :n].tolist() for b, n in enumerate(lens)]
    p = batching.prefix([0, 1, 2], batching.common_prefix(rows))
    assert p == 20
    weights = torch.rand(3, 31, V)

    def run(share: bool):
        model.zero_grad(set_to_none=True)
        calls = []
        hook = model.get_decoder().register_forward_hook(lambda m, a, kw, o: calls.append(kw["input_ids"].shape),
                                                         with_kwargs=True)
        fwd = HiddenForward(model, share_prefix=share)
        hidden = fwd(model, {"input_ids": ids, "attention_mask": am}, p)
        ((fwd.head(hidden) * weights).sum(-1) * am).sum().backward()
        hook.remove()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls

    h_full, g_full, calls_full = run(False)
    h_shared, g_shared, calls_shared = run(True)
    assert calls_full == [(3, 31)] and calls_shared == [(1, 20), (3, 11)]  # the prefix ran once
    real = am.bool()
    torch.testing.assert_close(h_shared[real], h_full[real], atol=1e-5, rtol=1e-5)
    for name, g in g_full.items():
        # float32 sums in another order: within a millionth of the gradient's own scale
        torch.testing.assert_close(g_shared[name], g, atol=1e-6 * g.abs().max().item(), rtol=1e-4, msg=name)


def test_optimizer_is_fused_adam_only_where_offload_needs_it(monkeypatch):
    """ZeRO-3 offloads only DeepSpeed's FusedAdam (seen on an H200); where its kernel cannot load, the learner
    stops naming the setting instead of silently keeping both roles on the GPU."""
    from piplay_ray.learner.role_engine import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(params, LearnerConfig(), torch.device("cpu"))) is torch.optim.AdamW

    def unbuildable(*args, **kwargs):
        raise ValueError("invalid literal for int() with base 10: '0a'")

    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", types.SimpleNamespace(FusedAdam=unbuildable))
    with pytest.raises(RuntimeError, match="learner.offload_inactive=true.*'0a'"):
        make_optimizer(params, LearnerConfig(offload_inactive=True), torch.device("cuda"))
