"""The run directory: where a run's config, metrics, task sets, samples, checkpoints and logs live.

The directory is deterministic (``run.dir``, else ``run.root/run.name``) so that re-running the same
command finds the previous run's checkpoints and resumes it.
"""

from __future__ import annotations

import time
from pathlib import Path

from piplay_ray.config import Config, dump_config
from piplay_ray.records import Task, Trajectory, to_dict


def run_path(cfg: Config) -> Path:
    return Path(cfg.run.dir or Path(cfg.run.root) / cfg.run.name).expanduser().resolve()


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        for sub in ("tasks", "samples", "checkpoints", "logs"):
            (path / sub).mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, cfg: Config) -> RunDir:
        path = run_path(cfg)
        if path.exists() and not cfg.run.resume and any(path.iterdir()):
            path = path.with_name(f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        run = cls(path)
        (path / "config.yaml").write_text(dump_config(cfg))
        return run


def sample_row(task: Task, traj: Trajectory, reward: float, tokens: list[str],
               teacher_ids: list[list[int]] | None, teacher_logprobs: list[list[float]] | None,
               teacher_tail: list[float] | None) -> dict:
    """A dashboard row: the task, the trajectory and a per-token teacher–student disagreement.

    The per-token value is the one-sample estimate of KL(student ‖ teacher) at that position,
    log p_student(y_t) − log p_teacher(y_t), with the teacher's tail mass standing in for log p_teacher
    when y_t is outside its top-K. It is what colours the dashboard's tokens; the training loss uses the
    full top-K form.
    """
    from piplay_ray.diagnostics import token_disagreement

    token_kl = [None if v is None else round(v, 4)
                for v in token_disagreement(traj, teacher_ids, teacher_logprobs, teacher_tail)]
    task_d = to_dict(task)
    task_d["trajectory"] = None  # the examiner's own trajectory is not needed to browse the student's
    return {"task": task_d, "trajectory": to_dict(traj), "reward": reward, "tokens": tokens, "token_kl": token_kl}
