"""Run a causal LM for its final hidden states and LM head instead of its full logits.

The loss makes logits a chunk of tokens at a time from the last hidden states (`token_stats`), so the
model's forward must not make [tokens x vocab] logits itself: it is called with ``logits_to_keep=1`` and a
hook on the decoder keeps its output. Going through the model's (or DeepSpeed engine's) own forward keeps
ZeRO-3's parameter gathering and gradient checkpointing as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor


class HiddenForward:
    """`forward(call, batch)` -> final hidden states [B, T, H]; `head` maps them to logits."""

    def __init__(self, model: torch.nn.Module):
        self.head = model.get_output_embeddings()
        self._kept: Tensor | None = None
        self._checked = False
        model.get_decoder().register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._kept = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def __call__(self, call, batch: dict[str, Tensor]) -> Tensor:
        """`call`: the model or its DeepSpeed engine (same module)."""
        out = call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
        hidden, self._kept = self._kept, None
        if hidden is None:
            raise RuntimeError("the model's decoder did not run: cannot take its hidden states")
        if not self._checked:  # the head alone must give the model's logits (no scaling or soft-capping)
            with torch.no_grad():
                mine = self.head(hidden[:, -1]).float()
            if not torch.allclose(mine, out.logits[:, -1].float(), rtol=1e-3, atol=1e-3):
                raise RuntimeError("this model's logits are not its LM head applied to the last hidden state; "
                                   "the chunked loss does not support it")
            self._checked = True
        return hidden
