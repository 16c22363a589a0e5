"""The project root, `piplay train` as a process, and a run's metrics rows, for the run tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train(run_dir: Path, *overrides: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """`piplay train` on configs/tiny.yaml as a subprocess (the slow runs use it); its output in the run's logs."""
    cmd = [sys.executable, "-m", "piplay_ray", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"run.dir={run_dir}", "checkpoint.every=1", "checkpoint.keep=3", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "logs" / "test-driver.log", "a") as f:
        f.write(proc.stdout + proc.stderr)
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
