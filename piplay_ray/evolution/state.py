"""The loop state: where a run is, saved in every checkpoint (the driver state) and restored on resume."""

from __future__ import annotations

from dataclasses import dataclass, field

from piplay_ray.roles import TRAINED


@dataclass
class LoopState:
    """Where the loop is (phase: examiner -> tasks -> student -> the next iteration's examiner; done)."""

    iteration: int = 0
    phase: str = "examiner"  # examiner -> tasks -> student -> (next iteration) ; "done" at the end
    phase_steps: int = 0  # learner steps done in the current phase
    versions: dict[str, int] = field(default_factory=lambda: {r: 0 for r in TRAINED})
    global_step: int = 0
    accounting: dict[str, dict] = field(default_factory=dict)  # per task set: issued/trained/dropped
    candidates: dict[str, list[dict]] = field(default_factory=dict)  # examiner step -> its gate-passing tasks
    counters: dict[str, dict | int] = field(default_factory=dict)  # fault counters (RunBook.counters)
    metrics_position: int = 0  # bytes of metrics.jsonl written when the state was saved

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        return cls(**d)
