"""A batch and transformers' sampling logprobs, for the tests that compare vLLM with the learner."""

from __future__ import annotations

import torch

from piplay_ray.records import Experience


def student_batch(seed: int) -> list[Experience]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(4):
        prompt, resp = torch.randint(5, 2000, (8,), generator=g), torch.randint(5, 2000, (16 + 3 * i,), generator=g)
        out.append(Experience(group_id=str(i // 2), role="student", prompt_ids=prompt.tolist(),
                              response_ids=resp.tolist(), mask=[1] * len(resp), logprobs=[-7.0] * len(resp),
                              reward=float(i % 2), advantage=1.0 if i % 2 else -1.0, version=0))
    return out


def sampled_logprobs(model, traj) -> torch.Tensor:
    """Transformers' logprob of every model-generated token of a trajectory."""
    ids = traj.prompt_ids + traj.response_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    p = len(traj.prompt_ids)
    pos = [p + i for i, m in enumerate(traj.mask) if m]
    return lp[[q - 1 for q in pos], [ids[q] for q in pos]]
