"""A toy privileged arm and a toy outcome reward: plug-ins from outside the package, named in a config as
`helpers.plugins:TOY_ARM` and `helpers.plugins:toy_reward` (tests/ is on every Ray worker's PYTHONPATH)."""

from __future__ import annotations

from piplay_ray.method.privileged import Arm


def _hint(task, budget, cap, seed) -> str:
    return f"Hint: the answer has {len(task.answer.split())} word(s) and starts with {task.answer[:1]!r}."


TOY_ARM = Arm("toy_hint", _hint, shortens=False)
TOY_REWARD = 0.37  # no mean of exact matches over the tiny config's 4 samples a step


def toy_reward(prediction: str | None, golden) -> float:
    """TOY_REWARD whatever the answer: a run's `student/reward` then shows which reward it used."""
    return TOY_REWARD
