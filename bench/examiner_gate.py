"""How often an examiner model writes a task that passes the integrity gate, sampled as in a run.

The examiner's gate pass rate and its share of the student task set are targets of `make run` that a 135M
model misses (README); this measures them without a run, e.g. to compare warm-start recipes. `n` source
documents and hop targets are drawn as the loop draws them, the real agent loop runs each attempt on the
config's engine (one worker, in this process) against the config's retriever at the config's temperature,
and each trajectory is built into a task and gated exactly as the driver does.

    python bench/examiner_gate.py [--config configs/local.yaml] [--model DIR] [--n 48] [--temperature T]

Prints one JSON line: pass rate, each gate flag's failure share, answers and questions written, searches per
attempt (overall and by hop target: an examiner asked for h hops should search h - 1 times), seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class LocalSearch:
    """The search env's service in this process, with the pool's `search_async` interface."""

    def __init__(self, cfg):
        from piplay_ray.actors.search_env import SearchEnvImpl

        self.env = SearchEnvImpl(cfg)

    def search_async(self, queries, topk=None):
        return self.env.search(queries, topk)


async def attempts(worker, sampler, n: int):
    docs, hops = sampler.sample(n)
    return docs, hops, await worker.examiner_rollouts(docs, hops)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    ap.add_argument("--model", help="examiner model folder (default: the config's, warm start built if missing)")
    ap.add_argument("--n", type=int, default=48, help="examiner attempts")
    ap.add_argument("--temperature", type=float, help="default: rollout.temperature")
    ap.add_argument("--iteration", type=int, default=0, help="which iteration's document draw")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args()

    from piplay_ray import assets
    from piplay_ray.actors.rollout import RolloutWorkerImpl, turn_limits
    from piplay_ray.config import load_config
    from piplay_ray.evolution import warmup
    from piplay_ray.method.examiner import ExaminerSampler, build_task, gate_failures
    from piplay_ray.retrieval.corpus import Corpus

    cfg = load_config(args.config, args.overrides)
    if args.temperature is not None:
        cfg.rollout.temperature = args.temperature
    model = args.model or assets.resolve_model(warmup.prepare(cfg).model.path_for("examiner"))
    sampler = ExaminerSampler(Corpus(assets.resolve_corpus(cfg.search.corpus)), cfg.examiner.hop_weights,
                              seed=cfg.run.seed)
    sampler.start_iteration(args.iteration)
    worker = RolloutWorkerImpl("examiner", model, cfg.rollout, LocalSearch(cfg.search), max_turns=turn_limits(cfg),
                               dtype=cfg.model.dtype, seed=cfg.run.seed)
    try:
        t0 = time.perf_counter()
        docs, hops, trajs = asyncio.run(attempts(worker, sampler, args.n))
        seconds = time.perf_counter() - t0
    finally:
        worker.shutdown()
    tasks = [build_task(t, d, h, cfg.examiner, args.iteration) for t, d, h in zip(trajs, docs, hops, strict=True)]
    passed = sum(all(t.flags.values()) for t in tasks)
    print(json.dumps({"bench": "examiner_gate", "model": model, "engine": cfg.rollout.engine,
                      "temperature": cfg.rollout.temperature, "n": len(tasks), "passed": passed,
                      "pass_rate": round(passed / len(tasks), 4),
                      "fail_share": {k: round(v, 4) for k, v in gate_failures(tasks).items()},
                      "with_question": sum(bool(t.question) for t in tasks),
                      "with_answer": sum(bool(t.answer) for t in tasks),
                      "searches_per_attempt": round(sum(len(t.qcp) for t in tasks) / len(tasks), 3),
                      "searches_by_hop_target": {h: round(sum(len(t.qcp) for t in tasks if t.hops == h)
                                                          / max(1, sum(t.hops == h for t in tasks)), 3)
                                                 for h in sorted({t.hops for t in tasks})},
                      "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
