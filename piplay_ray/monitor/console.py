"""A quiet console: actor output (vLLM, Ray, DeepSpeed, transformers) goes to files under `run_dir/logs/`.

The terminal keeps the progress bars, the driver's phase/evaluation lines and the project's own warnings and
errors. Every Ray worker process started for a local run redirects its stdout and stderr (file descriptors, so
C++ and child-process output follows) to `logs/worker-<pid>.log` through Ray's worker setup hook; the first
line names what the worker runs once an actor starts in it. `logging.verbose` (or `piplay train --verbose`)
brings everything back to the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from piplay_ray.rundir import log_dir

LOG_DIR_ENV = "PIPLAY_LOG_DIR"
HOOK = "piplay_ray.monitor.console.redirect_worker_output"


def redirect_worker_output() -> None:
    """Ray worker setup hook: send this process's stdout/stderr to a file of its own under the log folder."""
    folder = os.environ.get(LOG_DIR_ENV)
    if not folder:
        return
    path = Path(folder) / f"worker-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def ray_init_options(run_dir: str | os.PathLike, verbose: bool) -> dict:
    """Keyword arguments for a local `ray.init`: quiet unless `verbose`."""
    if verbose:
        return {"runtime_env": {"env_vars": {}}}
    folder = log_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return {"log_to_driver": False, "logging_level": logging.ERROR,
            "runtime_env": {"env_vars": {LOG_DIR_ENV: str(folder.resolve())}, "worker_process_setup_hook": HOOK}}


def quiet_driver(verbose: bool) -> None:
    """Library chatter in the driver process itself (transformers, Ray's client) down to errors."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray's C++ core worker writes its own error-level notes (e.g. on restartable actors' arguments) straight
    # to the driver's stderr; real failures still reach the driver as Python exceptions
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in ("transformers", "ray", "deepspeed", "vllm", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def shown(path: str | os.PathLike) -> str:
    """`path` as the terminal shows it: relative to the working directory when inside it, else absolute."""
    full = Path(path).resolve()
    try:
        return str(full.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(full)


def where(run_dir: str | os.PathLike) -> str:
    """The hint added to an actor error: which folder holds the actors' output."""
    logs = shown(log_dir(run_dir))
    return f"actor output: {logs}/ (worker-<pid>.log; `grep -l Error {logs}/*`)"


def say(msg: str) -> None:
    """A driver line on the terminal (phases, evaluations, faults), kept by the quiet console."""
    print(f"[piplay] {msg}", file=sys.stderr, flush=True)
