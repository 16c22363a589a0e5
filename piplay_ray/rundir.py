"""The run directory: where a run's config, metrics, task sets, samples, checkpoints and logs live.

The directory is deterministic (``run.dir``, else ``run.root/run.name``) so that re-running the same
command finds the previous run's checkpoints and resumes it. Every path inside it is named here, and
:func:`write_atomic` is how a file that a reader (the dashboard, a resumed run) may open is written.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from piplay_ray.config import Config, dump_config

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
HEALTH = "health.json"
ACCOUNTING = "accounting.json"
SUMMARY = "summary.json"
TEACHER_SNAPSHOT = "teacher-snapshot"  # the teacher's EMA after its latest update (restart recovery)
TENSORBOARD = "tensorboard"
FOLDERS = ("tasks", "samples", "checkpoints", "logs")


def run_path(cfg: Config) -> Path:
    return Path(cfg.run.dir or Path(cfg.run.root) / cfg.run.name).expanduser().resolve()


def task_set_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(run_dir) / "tasks" / f"iter-{iteration}.jsonl"


def attempts_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    """Every task the final examiner wrote for the task set of `iteration`, with its gate flags."""
    return Path(run_dir) / "tasks" / f"iter-{iteration}-attempts.jsonl"


def samples_path(run_dir: str | os.PathLike, role: str, step: int) -> Path:
    return Path(run_dir) / "samples" / f"{role}-step-{step:06d}.jsonl"


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    """`run_dir/checkpoints`; a path already named `checkpoints` is taken as the root itself."""
    path = Path(run_dir)
    return path if path.name == "checkpoints" else path / "checkpoints"


def log_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "logs"


def step_eval_name(student_step: int) -> str:
    """The name of the held-out evaluation after `student_step` student steps (eval.every_student_steps)."""
    return f"student-step-{student_step}"


def eval_dir(run_dir: str | os.PathLike, name: str | None = None) -> Path:
    """`eval/` (every evaluation's outputs) or `eval/<name>/` (one evaluation's)."""
    return Path(run_dir) / "eval" / (name or "")


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so a reader sees
    the old file or the new one, never half of it (also with several writers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        for sub in FOLDERS:
            (path / sub).mkdir(parents=True, exist_ok=True)

    @property
    def accounting(self) -> Path:
        return self.path / ACCOUNTING

    def task_set(self, iteration: int) -> Path:
        return task_set_path(self.path, iteration)

    @classmethod
    def create(cls, cfg: Config) -> RunDir:
        path = run_path(cfg)
        if path.exists() and not cfg.run.resume and any(path.iterdir()):
            path = path.with_name(f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        run = cls(path)
        (path / CONFIG).write_text(dump_config(cfg))
        return run
