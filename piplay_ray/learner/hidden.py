"""Run a causal LM for its final hidden states and LM head instead of its full logits.

The loss makes logits a chunk of tokens at a time from the last hidden states (`token_stats`), so the
model's forward must not make [tokens x vocab] logits itself: it is called with ``logits_to_keep=1`` and a
hook on the decoder keeps its output. Going through the model's (or DeepSpeed engine's) own forward keeps
ZeRO-3's parameter gathering and gradient checkpointing as they are.

The rows of a micro-batch often begin with the same tokens (a GRPO group's prompt; the instructions every
prompt of a role opens with): that prefix runs once, and the rest of every row attends to its keys and
values — the same values and gradients as the full forward, for ~30% fewer tokens through the model. The
micro-batch planner says how long that prefix is (`batching.prefix`), so one rule sets both cost and run.
A packed batch (`packing.py`, one row, ``position_ids`` restarting per sequence) runs whole, without
attention mask or cache, so that transformers keeps each sequence's attention to itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from piplay_ray.learner import packing


class HiddenForward:
    """`forward(call, batch, prefix)` -> final hidden states [B, T, H]; `head` maps them to logits.
    `share_prefix` says whether a common prefix may run once (not under gradient checkpointing, which keeps
    no key/value cache)."""

    def __init__(self, model: torch.nn.Module, share_prefix: bool = True):
        self.head = model.get_output_embeddings()
        self.config = model.config
        self.share_prefix = share_prefix
        self._kept: Tensor | None = None
        self._checked = False
        model.get_decoder().register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._kept = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _take(self) -> Tensor:
        hidden, self._kept = self._kept, None
        if hidden is None:
            raise RuntimeError("the model's decoder did not run: cannot take its hidden states")
        return hidden

    def __call__(self, call, batch: dict[str, Tensor], prefix: int = 0) -> Tensor:
        """`call`: the model or its DeepSpeed engine (same module); `prefix`: leading tokens every row has in
        common (right padding), run once when > 0."""
        ids, am = batch["input_ids"], batch.get("attention_mask")
        p = prefix if self.share_prefix else 0
        if "position_ids" in batch:  # packed: a cache or a 2-D mask would hide the sequence starts
            if p > 0:
                raise ValueError("a packed batch runs without a shared prefix")
            packing.check_attention(self.config)
            out = call(input_ids=ids, position_ids=batch["position_ids"], attention_mask=None, use_cache=False,
                       logits_to_keep=1)
            hidden = self._take()
        elif p > 0:
            pre = call(input_ids=ids[:1, :p], attention_mask=am[:1, :p], use_cache=True, logits_to_keep=1)
            before = self._take().expand(len(ids), -1, -1)
            cache = pre.past_key_values
            cache.batch_repeat_interleave(len(ids))
            out = call(input_ids=ids[:, p:], attention_mask=am, past_key_values=cache, use_cache=False,
                       logits_to_keep=1)
            hidden = torch.cat([before, self._take()], dim=1)
        else:
            out = call(input_ids=ids, attention_mask=am, logits_to_keep=1)
            hidden = self._take()
        if not self._checked:  # the head alone must give the model's logits (no scaling or soft-capping)
            with torch.no_grad():
                mine = self.head(hidden[:, -1]).float()
            if not torch.allclose(mine, out.logits[:, -1].float(), rtol=1e-3, atol=1e-3):
                raise RuntimeError("this model's logits are not its LM head applied to the last hidden state; "
                                   "the chunked loss does not support it")
            self._checked = True
        return hidden
