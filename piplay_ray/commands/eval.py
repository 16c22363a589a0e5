"""`piplay eval --config F --model M [--data QA ...] [--methods ...] [--out DIR]`: the agent and its baselines.

It starts the search env and a student rollout pool on the model (a warm-start name evaluates that warm
start's student) and answers every question once, greedy, by each method: the search agent, the same model
closed-book (no search), and BM25 alone (its top-1 article's title). The built-in natural set is scored in full
unless `eval.natural_size=N` is given. It prints EM, F1 and searches per set and
per single / two-article question, and writes each method's per-example outputs. Actor output goes to
`OUT/logs/` unless `logging.verbose`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from piplay_ray import assets
from piplay_ray.commands.train import init_ray
from piplay_ray.config import load_config
from piplay_ray.errors import UserInputError
from piplay_ray.evolution import warmup
from piplay_ray.evolution.evaluation import (
    METHODS,
    eval_config,
    evaluate,
    load_eval_examples,
    retrieval_records,
    write_results,
)
from piplay_ray.method.scores import format_table, summarize
from piplay_ray.monitor import console


def run(args) -> int:
    methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserInputError(f"--methods: {', '.join(bad) or 'none given'} not among {', '.join(METHODS)}")
    cfg = load_config(args.config, args.overrides)
    if not any(o.startswith("eval.natural_size=") for o in args.overrides):
        cfg.eval.natural_size = None  # every natural question: a config's size is for a run's in-loop evaluation
    run_eval(cfg, model=args.model, data=args.data, out=args.out, methods=methods)
    return 0


def run_eval(cfg, model: str, data: Sequence[str] | None = None, out: str | None = None,
             methods: Sequence[str] = METHODS) -> dict[str, dict]:
    """Score `model` by each of `methods` on the questions; returns {method: summary} and writes
    OUT/METHOD/examples.jsonl and metrics.json."""
    import asyncio

    import ray

    from piplay_ray.actors.rollout_pool import RolloutPool
    from piplay_ray.actors.search_env import SearchEnvPool

    cfg = eval_config(cfg)
    examples = load_eval_examples(cfg, data)
    out = Path(out or os.path.join(cfg.run.root, f"eval-{time.strftime('%Y%m%d-%H%M%S')}"))
    if name := warmup.recipe_name(model):  # a warm start of both roles: its student is what is evaluated
        model_path = str(warmup.build(name, cfg) / "student")
    else:
        model_path = assets.resolve_model(model)
    started = not ray.is_initialized()
    init_ray(cfg, out)  # quiet as `piplay train`: actor output under OUT/logs/
    summaries = {}
    try:
        search = SearchEnvPool(cfg.search, cfg.fault)
        pool = RolloutPool.from_config("student", model_path, cfg, search) if set(methods) - {"retrieval"} else None
        for method in methods:
            t0 = time.time()
            console.say(f"{method}: {len(examples)} questions")
            if method == "retrieval":
                records = retrieval_records(search, examples)
                summary = summarize(records)
            else:
                summary, records = asyncio.run(evaluate(pool, examples, closed_book=method == "closed_book"))
            write_results(out / method, summary, records, {"method": method, "model": model, "model_path": model_path,
                                                           "examples": len(examples),
                                                           "seconds": round(time.time() - t0, 1)})
            summaries[method] = summary
    finally:
        if started:
            ray.shutdown()
    print(format_table(summaries))
    print(f"per-example outputs: {out}/<method>/examples.jsonl", file=sys.stderr)
    return summaries
