"""A packed learner step in real DeepSpeed (one gloo rank in this process, the tiny model) against plain torch
on the right-padded full batch: `learner.pack_sequences` with the k3 KL to a reference (which runs on the
packed micro-batches too), with and without activation checkpointing; and `learner.zero_stage: 3` on one rank
running as stage 2 (nothing to partition), offloading the idle role all the same."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.learner import LR, MB_TOKENS, W_ATOL, experience_batch, learner_config, load_model
from transformers import AutoTokenizer

from piplay_ray.learner import batching
from piplay_ray.learner.collate import collate
from piplay_ray.learner.losses import compute_loss, masked_logprobs
from piplay_ray.learner.rank import LearnerWorkerImpl, _free_port, rank_args

BETA = 0.05


@pytest.fixture(scope="module")
def process():
    """The ranks join one one-rank gloo group in this process; its environment and group are restored after,
    and DeepSpeed's cached clone of the group dropped, so that a later module can start a group of its own."""
    from deepspeed.utils import groups

    env = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups._WORLD_GROUP = None
    os.environ.clear()
    os.environ.update(env)


def _worker(tiny_model, roles, **over):
    cfg = learner_config(tiny_model, **over)
    w = LearnerWorkerImpl(rank=0, world_size=1, **rank_args(cfg, roles))
    return w, cfg, w.setup("127.0.0.1", _free_port(), 0, 1, [])


def _plain_torch_step(tiny_model, exps, cfg):
    """One full-batch step of the padded batch: loss with k3 KL to the initial model, clip, AdamW."""
    pad = AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    model, ref = load_model(tiny_model).train(), load_model(tiny_model)
    batch = collate(exps, pad)
    with torch.no_grad():
        batch["ref_logprobs"] = masked_logprobs(ref(input_ids=batch["input_ids"],
                                                    attention_mask=batch["attention_mask"]).logits, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = compute_loss(logits, batch, cfg.learner.loss, 0.0)[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.grad_clip)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=cfg.learner.weight_decay)
    opt.step()
    return float(loss), {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_packed_step_equals_plain_torch_on_the_padded_batch(process, tiny_model, checkpointing):
    w, cfg, _ = _worker(tiny_model, ("student",), **{"learner.pack_sequences": True, "learner.loss.kl_beta": BETA,
                                            "learner.gradient_checkpointing": checkpointing})
    try:
        exps = experience_batch("student", seed=4, n=7, head=20)  # a shared prefix: packing runs it per row
        lengths = [e.num_tokens for e in exps]
        m = w.train_step("student", exps)
        want_mb = len(batching.pack(lengths, MB_TOKENS, packed=True))
        assert m["micro_batches"] == want_mb < len(batching.pack(lengths, MB_TOKENS))  # no padding: fewer
        loss, want = _plain_torch_step(tiny_model, exps, cfg)
        assert m["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
        assert m["ref_kl"] == pytest.approx(0.0, abs=1e-7)  # the reference saw the same packed rows
        got, base = w.state_dict("student"), dict(load_model(tiny_model).named_parameters())
        for name, r in want.items():
            assert (r - base[name]).abs().max() > 0, name
            torch.testing.assert_close(got[name], r, atol=W_ATOL, rtol=0)
    finally:
        w.close()


def test_zero3_on_one_rank_runs_as_zero2_and_still_offloads(process, tiny_model):
    w, _, info = _worker(tiny_model, ("examiner", "student"),
                         **{"learner.zero_stage": 3, "learner.offload_inactive": True})
    try:
        assert info["zero_stage"] == 2 and not w.policies["student"].zero3
        assert all(p.numel() > 0 for p in w.policies["student"].engine.module.parameters())  # whole, not partitioned
        w.train_step("student", experience_batch("student", seed=3, n=4))
        assert w.offloaded_states("examiner") == ["hp_params", "lp_grads", "lp_params", "optim_states"]
    finally:
        w.close()
