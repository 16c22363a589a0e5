"""`piplay eval --config F --model M [--data QA ...] [--out DIR]`: score a model as the student search agent.

It starts the search env and a student rollout pool on the model (a warm-start name evaluates that warm
start's student), runs every question once, greedy, prints the table and writes per-example outputs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from piplay_ray import assets
from piplay_ray.config import load_config
from piplay_ray.evolution import warmup
from piplay_ray.evolution.evaluation import (
    eval_config,
    evaluate,
    format_table,
    load_eval_examples,
    write_results,
)


def run(args) -> int:
    run_eval(load_config(args.config, args.overrides), model=args.model, data=args.data, out=args.out)
    return 0


def run_eval(cfg, model: str, data: Sequence[str] | None = None, out: str | None = None) -> dict:
    """`piplay eval`: start the search env and a student rollout pool on `model`, score, write results."""
    import asyncio

    import ray

    from piplay_ray.actors.rollout_pool import RolloutPool
    from piplay_ray.actors.search_env import SearchEnvPool

    cfg = eval_config(cfg)
    examples = load_eval_examples(cfg, data)
    out = out or os.path.join(cfg.run.root, f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    if name := warmup.recipe_name(model):  # a warm start of both roles: its student is what is evaluated
        model_path = str(warmup.build(name, cfg) / "student")
    else:
        model_path = assets.resolve_model(model)
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray.address if cfg.run.mode == "cluster" else None, num_cpus=cfg.ray.num_cpus,
                 namespace=cfg.ray.namespace, include_dashboard=False)
    try:
        search = SearchEnvPool(cfg.search, cfg.fault)
        pool = RolloutPool.from_config("student", model_path, cfg, search)
        t0 = time.time()
        summary, records = asyncio.run(evaluate(pool, examples))
        meta = {"model": model, "model_path": model_path, "examples": len(examples),
                "seconds": round(time.time() - t0, 1)}
    finally:
        if started:
            ray.shutdown()
    write_results(out, summary, records, meta)
    print(format_table(summary))
    print(f"per-example outputs: {Path(out) / 'examples.jsonl'}", file=sys.stderr)
    return summary
