"""Teacher scoring time on a run's own student steps: the transformers teacher over each step's groups.

Reads a run directory's `samples/student-step-*.jsonl` (each sampled trajectory with its task) and its
`config.yaml`, builds the teacher as the run did (the student's warm start, the run's `teacher` section) in
this process, and times `score` on every step's trajectories, after one untimed warm-up step. The teacher's
tokens are what its forwards process: each response, and each context once per group of responses that
share it (the G responses of a task) — against once per response when every sequence is run whole.

    python bench/teacher_scoring.py [--run runs/local] [--threads 1]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "local"), help="a finished run directory")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the teacher actor's CPU)")
    args = ap.parse_args()

    import torch

    from piplay_ray.config import load_config
    from piplay_ray.evolution import warmup
    from piplay_ray.records import Task, Trajectory
    from piplay_ray.teacher import scoring as teacher_scoring
    from piplay_ray.teacher.actor import TeacherImpl

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = warmup.prepare(load_config(run / "config.yaml"))
    steps = []
    for f in sorted((run / "samples").glob("student-step-*.jsonl")):
        rows = [json.loads(line) for line in open(f)]
        steps.append(([Trajectory.from_dict(r["trajectory"]) for r in rows], [Task.from_dict(r["task"]) for r in rows]))
    if not steps:
        print(f"no student samples under {run / 'samples'}", file=sys.stderr)
        return 2
    teacher = TeacherImpl.from_config(cfg.model.path_for("teacher"), cfg)
    asyncio.run(teacher.score(*steps[0]))  # warm-up
    t0 = time.perf_counter()
    for trajs, tasks in steps:
        asyncio.run(teacher.score(trajs, tasks))
    seconds = time.perf_counter() - t0
    whole = shared = 0
    for trajs, tasks in steps:
        jobs, _, _ = teacher_scoring.plan(teacher.tokenizer, teacher.tcfg, teacher.max_len, teacher.seed, trajs, tasks)
        whole += sum(len(j.ids) for j in jobs)
        shared += sum(j.response_len for j in jobs) + sum(len(c) for c in {tuple(j.ids[: j.start]) for j in jobs})
    n = sum(len(t) for t, _ in steps)
    print(json.dumps({"bench": "teacher_scoring", "run": str(run), "steps": len(steps), "trajectories": n,
                      "threads": args.threads, "seconds": round(seconds, 2),
                      "seconds_per_step": round(seconds / len(steps), 2), "tokens_whole_sequences": whole,
                      "tokens_context_once": shared, "token_ratio": round(shared / whole, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
