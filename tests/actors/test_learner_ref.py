"""The reference KL in the real learner (Ray + DeepSpeed on CPU, tiny model): with kl_beta > 0 each rank
loads the frozen initial policy and reports k3 KL(pi || ref) as `ref_kl`, checked against a reference and
a policy computed here; the linear warm-up sets the reported learning rate."""

from __future__ import annotations

import pytest
import ray
import torch
from helpers.learner import experience_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from piplay_ray.config import load_config
from piplay_ray.learner.collate import collate
from piplay_ray.learner.learner import LearnerGroup
from piplay_ray.learner.losses import masked_logprobs

LR, BETA = 1e-3, 0.05


RAY_CPUS = 2


def _k3_mean(policy, reference, exps, pad):
    """mean over trained tokens of exp(ref - logp) - (ref - logp) - 1, from full logits of both models."""
    b = collate(exps, pad)
    with torch.no_grad():
        lp = [masked_logprobs(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b)
              for m in (policy, reference)]
    d = (lp[1] - lp[0])[b["mask"] > 0]
    return float((torch.exp(d) - d - 1).mean())


def test_reference_kl_in_the_learner(ray_local, tiny_model):
    cfg = load_config("configs/tiny.yaml", [f"model.base={tiny_model}", f"learner.lr={LR}",
                                            f"learner.loss.kl_beta={BETA}", "learner.lr_warmup_steps=2",
                                            "learner.num_cpus_per_rank=1"])
    group = LearnerGroup(cfg, roles=("student",))
    try:
        assert ray.get(group.workers[0].reference_loaded.remote("student"))
        exps = experience_batch("student", seed=3)
        m1 = group.train_step("student", exps)
        assert m1["ref_kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before any update
        m2 = group.train_step("student", exps)
        pad = AutoTokenizer.from_pretrained(tiny_model).pad_token_id
        ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        pol = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        pol.load_state_dict(group.state_dict("student"), strict=False)
        after_two = _k3_mean(pol, ref, exps, pad)  # the weights step 3 starts from
        assert m2["ref_kl"] > 0
        assert [m1["lr"], m2["lr"]] == pytest.approx([LR / 2, LR])
        m3 = group.train_step("student", exps)
        assert m3["ref_kl"] == pytest.approx(after_two, rel=1e-3)
    finally:
        group.shutdown()
