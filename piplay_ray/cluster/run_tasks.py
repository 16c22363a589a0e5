"""An experiment's runs as Ray tasks: arms side by side on one cluster, within one Ray job.

Each task drives one run: it starts `piplay train` as a process of its own, in cluster mode and connected
to the same cluster, whose actors then take the GPUs and CPUs their config asks for. So as many runs go at
once as the cluster holds, and the rest wait for Ray to free room (each run's resource check compares its
config with the whole cluster, not with what is free). The task itself asks for no CPU: it only waits. A run
that fails fails its own task; the others go on, and the experiment names it with its log.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import ray

from piplay_ray.config import Config

DRIVER_LOG = "experiment-driver.log"  # in each run directory: its `piplay train` output


@ray.remote(num_cpus=0, max_retries=0)
def _drive(cmd: list[str], log: str) -> int:
    with open(log, "ab") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode


def connect(cfg: Config, cpus: float) -> str:
    """Join the cluster that `cfg` runs on (`run.mode: cluster`: `ray.address`, $RAY_ADDRESS or the local
    head), or start one on this machine with at least `cpus` CPUs; returns the address runs join."""
    if not ray.is_initialized():
        if cfg.run.mode == "cluster":
            ray.init(address=cfg.ray.address or os.environ.get("RAY_ADDRESS", "auto"), namespace=cfg.ray.namespace)
        else:
            ray.init(num_cpus=max(cfg.ray.num_cpus or os.cpu_count() or 1, int(cpus + 0.999)),
                     namespace=cfg.ray.namespace, include_dashboard=False, log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def run_together(runs: dict[str, tuple[list[str], Path]], address: str) -> list[str]:
    """Run every `label -> (piplay train command, run dir)` at once as tasks, each joined to the cluster at
    `address`; the failures' descriptions."""
    pending = {}
    for label, (cmd, run_dir) in runs.items():
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*cmd, "run.mode=cluster", f"ray.address={address}"]
        pending[_drive.remote(cmd, str(run_dir / DRIVER_LOG))] = label, run_dir
        print(f"[piplay experiment] {label}: running as a Ray task in {run_dir} (log {DRIVER_LOG})", flush=True)
    failed = []
    while pending:
        (ref,), _ = ray.wait(list(pending))
        label, run_dir = pending.pop(ref)
        code = ray.get(ref)
        print(f"[piplay experiment] {label}: {'finished' if code == 0 else f'failed ({code})'}", flush=True)
        if code != 0:
            tail = (run_dir / DRIVER_LOG).read_text(errors="replace")[-1500:]
            failed.append(f"{label} exited with {code}; {run_dir / DRIVER_LOG} ends:\n{tail}")
    return failed
