"""Streaming vs synchronous student phase on the tiny config.

Runs `piplay train` twice in this process's environment — `replay.max_staleness=1` (rollouts for step j+1
overlap the learner's step j) and `replay.max_staleness=0` (strictly on-policy, generation and training
alternate) — and reads their metrics.jsonl: seconds per student learner step (from the moment the task set
is written to the last student step) and the learner's idle fraction (time waiting for experiences over
time waiting plus training). Prints one JSON line last.

    python bench/pipeline.py [--steps 6] [--config configs/tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, staleness: int, steps: int, workdir: Path) -> dict:
    run_dir = workdir / f"staleness-{staleness}"
    cmd = [sys.executable, "-m", "piplay_ray", "train", "--config", config, f"run.dir={run_dir}",
           f"replay.max_staleness={staleness}", "schedule.examiner_steps=1", f"schedule.student_steps={steps}",
           "checkpoint.every=0", "dashboard.enabled=false", "logging.tensorboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"train failed (max_staleness={staleness}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    start = next(r["time"] for r in rows if "tasks/size" in r)
    student = [r for r in rows if r["phase"] == "student" and "learner/version" in r]
    idle = [r["learner/idle_frac"] for r in student]
    return {"seconds_per_step": round((student[-1]["time"] - start) / len(student), 3),
            "learner_idle_frac": round(sum(idle) / len(idle), 3),
            "max_staleness_seen": max(r["replay/staleness"] for r in student)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        streaming = run(args.config, 1, args.steps, Path(tmp))
        print(json.dumps({"max_staleness": 1, **streaming}), flush=True)
        synchronous = run(args.config, 0, args.steps, Path(tmp))
        print(json.dumps({"max_staleness": 0, **synchronous}), flush=True)
    print(json.dumps({
        "bench": "pipeline", "config": Path(args.config).name, "student_steps": args.steps,
        "streaming_s_per_step": streaming["seconds_per_step"],
        "synchronous_s_per_step": synchronous["seconds_per_step"],
        "speedup": round(synchronous["seconds_per_step"] / streaming["seconds_per_step"], 3),
        "streaming_learner_idle_frac": streaming["learner_idle_frac"],
        "synchronous_learner_idle_frac": synchronous["learner_idle_frac"],
    }))


if __name__ == "__main__":
    main()
