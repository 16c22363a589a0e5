"""Synchronous vs step-boundary streaming vs in-flight weight updates: the student phase on a miniature cluster.

Runs `piplay train` once per mode on the same config and seed, on disjoint resources as on a cluster: the
learner's rank pinned to one core (`learner.cpu_cores`), everything else (rollout engines, teacher, search,
driver) to the other (`taskset`, and vLLM's thread binding), so generation and training do not compete for
cores as they would not on separate GPUs. The search agent's trajectories vary in length as they do in
training: `SEARCH_AGENT` lets one answer in a few tokens and another search four times with turns of up to 192
tokens (1,024 in all), and the engine runs 3 sequences at once, so a step's 12 trajectories go through it in
about 4 waves, as a paper-scale step's do (qwen3-4b: 1,280 trajectories, 256 sequences at once), and a wave
waits for its slowest trajectory.

- synchronous: `replay.max_staleness=0` (generate a step's groups, train on them, sync, repeat);
- streaming: `max_staleness=B` (`--bound`, 2 by default), syncs between requests (rollouts of step j+1 overlap
  learner step j, but a sync waits for the requests in flight and a round for its slowest trajectory);
- inflight: `max_staleness=B`, `rollout.inflight_updates=true` (weights go into the running requests; the
  rounds of consecutive steps overlap), the requests' KV recomputed under the new weights (`inflight_kv`);
- inflight_keep: the same, the old weights' KV kept (`rollout.inflight_kv=keep`: no recomputation, not exact).

A larger bound lets the producer run further ahead, so a long round or a long learner step is absorbed rather
than waited for (both vary by 50% from step to step with the trajectories' lengths), at the price of staler
tokens: on 2 cores a bound of 1 is too shallow for any overlapped mode to pass ~1.8x (docs/cluster.md).

From each run's metrics.jsonl: student steps per minute in the steady state (from the first learner step's end
to the last's: every mode's first step waits for a whole round, the pipeline's fill) and over the whole phase
(from the task set's writing), the learner's idle fraction (steady state), mean and max token staleness, the
mean time of a producer round (rollouts and teacher scoring of one step), of its rollouts and of its scoring, of a
push into the engines (in flight: pause, load, resume; a recomputed KV slows the round after it, not the push),
and every step's reward. Prints one JSON line per mode, then one with all of them, where `ceiling_vs_synchronous`
is what a mode would reach with its learner never idle (the synchronous step over its learner step): an
overlapped step is never shorter than its learner step.

    python bench/pipeline.py [--steps 6] [--config configs/local.yaml] [--bound 2]
        [--modes synchronous,streaming,inflight,inflight_keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
MODES = {  # the overlapped modes' staleness bound is --bound's
    "synchronous": ["rollout.inflight_updates=false"],
    "streaming": ["rollout.inflight_updates=false"],
    "inflight": ["rollout.inflight_updates=true", "rollout.inflight_kv=recompute"],
    "inflight_keep": ["rollout.inflight_updates=true", "rollout.inflight_kv=keep"],
}
SEARCH_AGENT = ["student.max_turns=4", "rollout.max_tokens_per_turn=192", "rollout.max_response_tokens=1024",
                "rollout.max_num_seqs=3"]


def run(config: str, mode: str, steps: int, bound: int, workdir: Path, cores: tuple[int, int],
        extra: list[str]) -> dict:
    run_dir = workdir / mode
    bound = 0 if mode == "synchronous" else bound
    engines, learner = cores
    cmd = ["taskset", "-c", str(engines), sys.executable, "-m", "piplay_ray", "train", "--config", config,
           f"run.dir={run_dir}", f"replay.max_staleness={bound}", *MODES[mode], f"learner.cpu_cores=[{learner}]",
           "learner.num_cpus_per_rank=1",
           "schedule.examiner_steps=0", f"schedule.student_steps={steps}", "schedule.iterations=1",
           "checkpoint.every=0", "dashboard.enabled=false", "logging.tensorboard=false", "eval.every=0",
           "eval.before_training=false", *extra]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(engines)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"train failed ({mode}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    start = next(r["time"] for r in rows if "tasks/size" in r)
    student = [r for r in rows if r["phase"] == "student"]
    learner = [r for r in student if "learner/version" in r]
    if len(learner) < 2:
        sys.exit(f"{mode}: {len(learner)} learner steps; the steady state needs at least 2")
    steady = learner[1:]
    seconds = (learner[-1]["time"] - learner[0]["time"]) / len(steady)
    rounds = [r["rollout/round_seconds"] for r in student if "rollout/round_seconds" in r]
    syncs = [r["weight_sync/seconds"] for r in student if "weight_sync/seconds" in r]
    phases = {k: [r[k] for r in student if k in r] for k in ("rollout/generate_seconds", "teacher/score_seconds")}
    phases = {k: round(mean(v), 1) if v else None for k, v in phases.items()}  # no scoring: an arm that does not teach
    return {"mode": mode, "steps": len(learner), "steps_per_min": round(60 / seconds, 3),
            "seconds_per_step": round(seconds, 1),
            "steps_per_min_with_fill": round(60 * len(learner) / (learner[-1]["time"] - start), 3),
            "learner_idle_frac": round(mean(r["learner/idle_frac"] for r in steady), 3),
            "learner_step_seconds": round(mean(r["learner/step_seconds"] for r in steady), 1),
            "round_seconds": round(mean(rounds), 1),
            "generate_seconds": phases["rollout/generate_seconds"], "score_seconds": phases["teacher/score_seconds"],
            "sync_seconds": round(mean(syncs), 2) if syncs else None,
            "token_staleness_mean": round(mean(r["replay/token_staleness_mean"] for r in learner), 3),
            "token_staleness_max": max(r["replay/token_staleness_max"] for r in learner),
            "reward_curve": [round(r["student/reward"], 3) for r in student if "student/reward" in r]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--bound", type=int, default=2, help="replay.max_staleness of the overlapped modes")
    ap.add_argument("--cores", default="0,1", help="the engines' core, the learner's core")
    ap.add_argument("--set", nargs="*", default=SEARCH_AGENT, help="config overrides of every mode")
    args = ap.parse_args()
    cores = tuple(int(c) for c in args.cores.split(","))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            out[mode] = run(args.config, mode, args.steps, args.bound, Path(tmp), cores, args.set)
            print(json.dumps(out[mode]), flush=True)
    base = out.get("synchronous", {}).get("steps_per_min")
    print(json.dumps({"bench": "pipeline", "config": Path(args.config).name, "student_steps": args.steps,
                      "bound": args.bound, "set": args.set,
                      "cores": {"engines": cores[0], "learner": cores[1]},
                      **{m: {k: v for k, v in r.items() if k != "mode"} for m, r in out.items()},
                      **({"speedup_vs_synchronous": {m: round(r["steps_per_min"] / base, 3) for m, r in out.items()},
                          "ceiling_vs_synchronous": {m: round(60 / base / r["learner_step_seconds"], 3)
                                                     for m, r in out.items() if m != "synchronous"}}
                         if base else {})}))


if __name__ == "__main__":
    main()
