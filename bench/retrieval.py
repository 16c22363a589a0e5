"""Retrieval throughput on the embedded corpus: one batched call of N queries vs N single-query calls.

Queries are seeded random article titles plus two words of their text (a realistic short search query).
Prints one JSON line last: {"bench": "retrieval", "bm25_batched_qps": ..., "bm25_single_qps": ..., ...}.

    python bench/retrieval.py [--n 256] [--topk 3] [--retrievers bm25 dense]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time


def queries_for(corpus, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for row in rng.sample(range(len(corpus)), n):
        doc = corpus[row]
        words = doc.contents.split("\n", 1)[-1].split()
        out.append(" ".join([doc.title, *rng.sample(words, min(2, len(words)))]))
    return out


def measure(retriever, queries: list[str], topk: int) -> dict:
    retriever.search(queries[:8], topk)  # warm up (lazy imports, first-call allocations)
    t = time.perf_counter()
    batched = retriever.search(queries, topk)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = [retriever.search([q], topk)[0] for q in queries]
    t_single = time.perf_counter() - t
    same = sum([d.id for d in a] == [d.id for d in b] for a, b in zip(batched, single, strict=True)) / len(queries)
    return {"batched_qps": len(queries) / t_batched, "single_qps": len(queries) / t_single, "batch_agrees": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--retrievers", nargs="+", default=["bm25", "dense"], choices=["bm25", "dense"])
    args = p.parse_args(argv)

    from piplay_ray.config import SearchConfig
    from piplay_ray.retrieval import make_retriever

    line: dict = {"bench": "retrieval", "n_queries": args.n, "topk": args.topk}
    for name in args.retrievers:
        t = time.perf_counter()
        retriever = make_retriever(SearchConfig(retriever=name), show_progress=True)
        line[f"{name}_load_s"] = round(time.perf_counter() - t, 2)
        queries = queries_for(retriever.corpus, args.n)
        line["docs"] = len(retriever.corpus)
        for key, value in measure(retriever, queries, args.topk).items():
            line[f"{name}_{key}"] = round(value, 3 if key == "batch_agrees" else 1)
        print(f"[bench] {name}: {line}", file=sys.stderr, flush=True)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
