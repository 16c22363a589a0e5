"""Rollout throughput: the same batch of agent rollouts on the vLLM engine and on the transformers engine.

Each engine runs in this process with the real BM25 search service; all trajectories are in flight at once
(the transformers engine serves them one forward pass at a time). Generated tokens per second counts model
tokens only (mask 1), over the wall time of the whole batch. The last line printed is one JSON object.

    python bench/rollout.py                       # tiny model and the embedded SmolLM2
    python bench/rollout.py --models tiny --questions 8
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections import Counter

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class LocalSearch:
    """The search env's service in this process, with the agent's `search(query, topk)` shape."""

    def __init__(self, search_cfg):
        from piplay_ray.actors.search_service import SearchService
        from piplay_ray.retrieval import make_retriever

        c = search_cfg
        self.service = SearchService(make_retriever(c), c.topk, c.max_topk, c.max_query_chars,
                                     c.doc_token_budget, c.batch_window_ms, c.cache_size)

    async def search(self, query: str, topk: int | None = None):
        (result,) = await self.service.search([query], topk)
        return result.to_hop(), result.text


def questions(n: int) -> list[str]:
    from piplay_ray import assets

    out = []
    with open(assets.corpus_path(), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % 97 == 0:
                out.append(f"What is {json.loads(line)['title']} best known for?")
            if len(out) == n:
                break
    return out


async def run_batch(engine, search, tokenizer, qs, n, spec, max_turns, max_response_tokens):
    from piplay_ray.method import protocol
    from piplay_ray.method.agent import run_agent

    prompts = [protocol.student_prompt_ids(tokenizer, q) for q in qs for _ in range(n)]
    return await asyncio.gather(*[run_agent(engine, search, tokenizer, p, spec, max_turns,
                                            max_response_tokens=max_response_tokens) for p in prompts])


def bench_engine(kind, model_path, args, search):
    from transformers import AutoTokenizer

    from piplay_ray.config import RolloutConfig
    from piplay_ray.engines import make_engine
    from piplay_ray.engines.base import SamplingSpec

    rcfg = RolloutConfig(engine=kind, max_model_len=2048, max_num_seqs=args.max_num_seqs, kv_cache_gib=1.0)
    t0 = time.perf_counter()
    engine = make_engine(kind, model_path, rcfg, dtype=args.dtype, seed=0)
    startup = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(model_path)
    spec = SamplingSpec(max_tokens=args.max_tokens_per_turn, temperature=1.0, top_p=1.0)
    qs = questions(args.questions)
    asyncio.run(run_batch(engine, search, tok, qs[:2], 1, spec, 1, 16))  # warm-up
    t0 = time.perf_counter()
    trajs = asyncio.run(run_batch(engine, search, tok, qs, args.n, spec, args.max_turns, args.max_response_tokens))
    wall = time.perf_counter() - t0
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    del engine
    gc.collect()
    generated = sum(sum(t.mask) for t in trajs)
    return {"tokens_per_s": round(generated / wall, 2), "generated_tokens": generated, "wall_s": round(wall, 2),
            "trajectories": len(trajs), "searches": sum(len(t.hops) for t in trajs),
            "mean_turns": round(sum(t.turns for t in trajs) / len(trajs), 2), "startup_s": round(startup, 1),
            "finish": dict(Counter(t.finish_reason for t in trajs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma list of builtin names or model paths")
    p.add_argument("--engines", default="vllm,transformers")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--n", type=int, default=2, help="samples per question")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--max-tokens-per-turn", type=int, default=96)
    p.add_argument("--max-response-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="the same for both engines (CPU: float32)")
    args = p.parse_args()

    from piplay_ray import assets
    from piplay_ray.config import SearchConfig

    search = LocalSearch(SearchConfig())
    result = {"questions": args.questions, "n": args.n, "max_turns": args.max_turns,
              "max_tokens_per_turn": args.max_tokens_per_turn, "dtype": args.dtype, "cpus": os.cpu_count()}
    for name in args.models.split(","):
        path = assets.resolve_model(f"builtin:{name}" if name in assets.BUILTIN_MODELS else name)
        row = {}
        for kind in args.engines.split(","):
            row[kind] = bench_engine(kind, path, args, search)
            print(f"[bench] {name} {kind}: {row[kind]}", file=sys.stderr, flush=True)
        if "vllm" in row and "transformers" in row:
            row["vllm_over_transformers"] = round(row["vllm"]["tokens_per_s"] / row["transformers"]["tokens_per_s"], 2)
        result[name] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
