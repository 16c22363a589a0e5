"""A teacher config, tasks and student trajectories shared by the teacher tests."""

from __future__ import annotations

from piplay_ray.config import load_config
from piplay_ray.method import protocol
from piplay_ray.records import Doc, Hop, Task, Trajectory


def teacher_config(backend="transformers", **kw):
    over = [f"teacher.backend={backend}", "teacher.top_k=8", "model.dtype=float32", "rollout.max_model_len=1024"]
    return load_config("configs/tiny.yaml", over + [f"{k}={v}" for k, v in kw.items()])


def make_task(i: int) -> Task:
    docs = [Doc(id=str(i), title=f"Title {i}", contents=f"Some text about topic {i} and its history."),
            Doc(id=str(i + 100), title="Rome", contents="Rome is the capital city of Italy.")]
    qcp = [Hop(query=f"topic {i} origin", docs=docs)] * (i % 3)
    return Task(id=f"t{i}", question=f"Where did topic {i} start?", answer="Rome", hops=1 + i % 3,
                source=docs[0], qcp=qcp)


def trajectories_for(tok, tasks):
    """Responses with model turns (mask 1) and an inserted information block (mask 0), varied lengths."""
    out = []
    for i, task in enumerate(tasks):
        turn1 = tok(f"<think>find {i}</think><search>topic {i}</search>", add_special_tokens=False).input_ids
        info = tok(protocol.information_block("Rome is a city." * (i + 1)), add_special_tokens=False).input_ids
        turn2 = tok("<answer>Rome</answer>" + "x" * i, add_special_tokens=False).input_ids
        resp = turn1 + info + turn2
        mask = [1] * len(turn1) + [0] * len(info) + [1] * len(turn2)
        out.append(Trajectory(prompt_ids=protocol.student_prompt_ids(tok, task.question), response_ids=resp,
                              mask=mask, logprobs=[0.0] * len(resp)))
    return out
