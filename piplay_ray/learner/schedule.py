"""The learning-rate schedule: a linear warm-up to `learner.lr`, then constant."""

from __future__ import annotations

import torch


def lr_factor(steps_done: int, warmup_steps: int) -> float:
    """Multiplier of `lr` for the optimizer step after `steps_done` steps: (s+1)/n during an n-step warm-up."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (steps_done + 1) / warmup_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps))
