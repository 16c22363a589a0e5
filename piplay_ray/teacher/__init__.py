"""The teacher service whole: an EMA of the student that also sees the privileged information.

- `context.py`: its prompt (the question and the arm's privileged text) and its top-K (+tail) scores
- `ema.py`: psi <- (1 - tau) psi + tau theta, the float32 masters and their checkpoint file
- `scoring.py`: scoring the student's tokens in batches, on a model or an engine
- `adapter.py`: the EMA of a LoRA adapter (learner.lora)
- `actor.py`: the `Teacher` Ray actor (its own model or engine); `client.py`: the driver's handle on it that
  survives restarts; `shared.py`: the teacher as a second adapter on the student's engines, on the driver

The loop talks to either handle through :class:`TeacherHandle`.
"""

from __future__ import annotations

from typing import Protocol


class TeacherHandle(Protocol):
    """What the evolution loop holds: `client.TeacherClient` or `shared.SharedTeacher`."""

    version: int  # the EMA version it holds
    form: str  # what its EMA takes: "full" weights, or the student's "adapter" (learner.lora)
    restarts: int
    last_error: str | None

    async def score(self, trajectories, tasks, with_stats: bool = False): ...

    async def ema_update(self, version: int, weights) -> object: ...

    async def load(self, version: int, weights) -> None: ...

    async def load_checkpoint(self, folder: str) -> int: ...

    async def save(self, folder: str) -> str: ...

    async def ensure(self) -> int: ...

    def reset(self) -> None: ...
