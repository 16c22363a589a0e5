"""Benchmark the sharded flat dense-index build: passages/s and peak RSS for two corpus sizes.

Each size builds from scratch in a fresh process (N rows cycling over the first `sizes[0]` passages of the
embedded corpus, so that every size has the same passage lengths — the encoder's activation peak follows the
longest batch, which is about content, not corpus size; shards of `--shard` passages) and reports its peak
resident set (VmHWM). Peak RSS must not grow with the corpus: it is bounded by one shard plus the encoder. The last field extrapolates the build time of wiki-18 (21M passages)
at the larger run's rate, on this machine and this encoder (MiniLM here; e5-base is several times slower).

    python bench/index_build.py [--sizes 2000 8000] [--shard 1000] [--encoder NAME|DIR] [--batch 64]

`--encoder` takes any sentence-transformers folder (e.g. a random-weight e5-base for timing on a GPU, where
the encoder runs in float16: `dense.load_encoder`).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIKI18 = 21_015_324  # passages in Search-R1's wiki-18 corpus


def build_one(n: int, shard: int, pool: int, encoder: str, batch: int) -> dict:
    from piplay_ray import assets
    from piplay_ray.retrieval.corpus import Corpus
    from piplay_ray.retrieval.dense import build_dense_index, load_encoder

    full = Corpus(assets.corpus_path())
    tmp = Path(tempfile.mkdtemp(prefix="piplay-index-bench-"))
    path = tmp / "corpus.jsonl"
    path.write_text("".join(json.dumps(full.raw(i % min(pool, len(full))) | {"id": str(i)}) + "\n" for i in range(n)))
    model = load_encoder(encoder)
    t0 = time.perf_counter()
    build_dense_index(Corpus(path), encoder, index_dir=str(tmp / "index"), model=model, show_progress=False,
                      shard_docs=shard, batch_size=batch)
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"docs": n, "seconds": round(seconds, 1), "docs_per_s": round(n / seconds, 1),
            "peak_rss_gb": round(hwm / 1e6, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[2000, 8000])
    ap.add_argument("--shard", type=int, default=1000)
    ap.add_argument("--encoder", default="builtin:minilm")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pool", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(build_one(args.one, args.shard, args.pool, args.encoder, args.batch)))
        return
    runs = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--shard", str(args.shard),
                              "--pool", str(args.sizes[0]), "--encoder", args.encoder, "--batch", str(args.batch)], check=True,
                             capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    small, large = runs
    print(json.dumps({"bench": "index_build", "encoder": args.encoder, "batch": args.batch,
                      "shard_docs": args.shard, "runs": runs,
                      "peak_rss_growth": round(large["peak_rss_gb"] / small["peak_rss_gb"], 3),
                      "wiki18_hours_here": round(WIKI18 / large["docs_per_s"] / 3600, 1)}))


if __name__ == "__main__":
    main()
