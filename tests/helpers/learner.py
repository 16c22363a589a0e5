"""A learner config, experience batches and a model loader shared by the learner tests."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

from piplay_ray.config import load_config
from piplay_ray.records import Experience

LR = 1e-3
# Two learners that should agree, compared weight by weight after their steps: Adam moves each weight by ~lr a
# step, and more where a gradient is near its eps, so summation order shows in a few weights: one in 16k differed
# by 1.03% of lr on an AMD AVX-512 host and by 1.18-1.35% on an Intel AVX-512 (FP16) one, all within 1% on AVX2
# hosts. A wrong loss scale or a lost micro-batch moves weights by a sizeable fraction of lr.
W_ATOL = LR * 0.02
MB_TOKENS = 96  # small: forces several micro-batches, and fillers on the 2-rank group


def learner_config(tiny_model, **over):
    keys = {"model.base": tiny_model, "learner.lr": LR, "learner.micro_batch_tokens": MB_TOKENS,
            "learner.zero_stage": 2, "learner.grad_clip": 1.0, "learner.num_cpus_per_rank": 1, **over}
    return load_config("configs/tiny.yaml", [f"{k}={v}" for k, v in keys.items()])


def experience_batch(role: str, seed: int, n: int = 5, head: int = 0) -> list[Experience]:
    """`n` random experiences; their prompts open with the same `head` tokens (shared instructions)."""
    rng = random.Random(seed)
    common = [rng.randrange(5, 2000) for _ in range(head)]
    out = []
    for i in range(n):
        p, r = rng.randint(4, 12), rng.randint(6, 30)
        mask = [0 if 3 <= j < 6 else 1 for j in range(r)]  # an inserted <information> span
        out.append(Experience(group_id=f"g{i // 2}", role=role,
                              prompt_ids=common + [rng.randrange(5, 2000) for _ in range(p)],
                              response_ids=[rng.randrange(5, 2000) for _ in range(r)], mask=mask,
                              logprobs=[(-rng.uniform(2, 8)) * m for m in mask], reward=float(i % 2),
                              advantage=(1.0 if i % 2 else -0.8) + 0.1 * i, version=0))
    return out


def load_model(path, state_dict=None):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if state_dict is not None:
        m.load_state_dict(state_dict, strict=False)
    return m.eval()
