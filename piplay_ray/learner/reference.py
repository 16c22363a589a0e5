"""The frozen reference policy for beta * KL(pi || ref): a role's initial weights, loaded only when
`learner.loss.kl_beta > 0`. Its logprobs of the sampled tokens are taken per micro-batch, chunked like the
loss, in the training dtype.

It is a plain module on the rank's device (not partitioned under ZeRO-3): one extra copy of the weights
per rank, without gradients or optimizer state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from piplay_ray.learner.hidden import HiddenForward
from piplay_ray.learner.losses import masked_logprobs


class Reference:
    def __init__(self, path: str, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.path = path
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        self.forward = HiddenForward(self.model)

    @torch.no_grad()
    def logprobs(self, batch: dict[str, Tensor], chunk_tokens: int, prefix: int = 0) -> Tensor:
        """log ref(sampled token) [B, T-1] at the trained positions (0 elsewhere); `prefix` as the policy's
        forward (`HiddenForward`)."""
        hidden = self.forward(self.model, batch, prefix)
        return masked_logprobs(hidden, batch, self.forward.head, chunk_tokens).float()
