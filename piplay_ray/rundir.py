"""The run directory: where a run's config, metrics, task sets, samples, checkpoints and logs live.

The directory is deterministic (``run.dir``, else ``run.root/run.name``) so that re-running the same
command finds the previous run's checkpoints and resumes it. Every path inside it is named here, and
:func:`write_atomic` is how a file that a reader (the dashboard, a resumed run) may open is written.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
import uuid
from pathlib import Path

from piplay_ray.config import Config, dump_config
from piplay_ray.errors import UserInputError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
HEALTH = "health.json"
DRIVER_LOCK = "driver.lock"  # held by the one driver that writes the run (its pid and host inside)
ACCOUNTING = "accounting.json"
SUMMARY = "summary.json"
REPLAY_SPILL = "replay.parquet"  # in a checkpoint's replay/ folder: the steps the replay store held
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
        self._lock = None
        for sub in FOLDERS:
            (path / sub).mkdir(parents=True, exist_ok=True)

    @property
    def accounting(self) -> Path:
        return self.path / ACCOUNTING

    def task_set(self, iteration: int) -> Path:
        return task_set_path(self.path, iteration)

    @classmethod
    def create(cls, cfg: Config) -> RunDir:
        """The run's directory, locked for this driver (`lock`), with the config it runs."""
        path = run_path(cfg)
        if path.exists() and not cfg.run.resume and any(path.iterdir()):
            path = path.with_name(f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        run = cls(path)
        run.lock()
        (path / CONFIG).write_text(dump_config(cfg))
        return run

    def lock(self) -> None:
        """Hold the run's driver lock until `unlock` (or this process ends): two drivers resuming one run would
        rewind each other's records. An flock, which the kernel drops when its holder dies, so a dead driver's
        lock is taken over; a live holder is named (pid, host) in the refusal."""
        f = open(self.path / DRIVER_LOCK, "a+", encoding="utf-8")  # noqa: SIM115  held open while the run lives
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "a process that did not say who it is"
            f.close()
            raise UserInputError(f"{self.path} is in use by another piplay driver ({holder}); wait for it to "
                                 "finish or stop it, or set run.dir to another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None
