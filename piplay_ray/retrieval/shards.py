"""The flat dense index built in shards: memory bounded by one shard, resumable after a kill, complete at the end.

Wiki-18 is 21M passages: its texts and embeddings together (~130 GB) do not fit a build pod. The build reads
the memory-mapped corpus `shard_docs` rows at a time, encodes them (on the GPU when there is one) and saves
the shard's embeddings as `shards/NNNNNN.npy` in a partial folder beside the index (written under a temporary
name, then renamed, so a shard file there is a finished shard). A rerun after a kill skips the finished
shards. With every shard on disk, `index.faiss` is written by appending the shards to the header of a FAISS
flat inner-product index, the bytes `faiss.write_index` gives `IndexFlatIP` (so it loads memory-mapped), and
the partial folder becomes the index folder, with its `DONE` marker, in one rename: whoever waits for the
index waits for `DONE`, never for a non-empty folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from piplay_ray.retrieval.corpus import Corpus

COPY_ROWS = 65_536  # rows per write when the shards are joined


def shard_path(partial: Path, i: int) -> Path:
    return partial / "shards" / f"{i:06d}.npy"


def write_flat_ip(shards: list[Path], dim: int, out: Path) -> int:
    """Write FAISS's IndexFlatIP file from embedding shards, one shard in memory at a time; returns ntotal."""
    ntotal = sum(int(np.load(p, mmap_mode="r").shape[0]) for p in shards)
    dummy = 1 << 20
    with open(out, "wb") as f:
        # fourcc, d, ntotal, two unused idx_t, is_trained, metric (0 = inner product), float count, floats
        f.write(b"IxFI" + struct.pack("<iqqq?i", dim, ntotal, dummy, dummy, True, 0))
        f.write(struct.pack("<Q", ntotal * dim))
        for p in shards:
            emb = np.load(p, mmap_mode="r")
            if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[1] != dim:
                raise ValueError(f"{p}: expected float32 rows of {dim}, got {emb.dtype} {emb.shape}")
            for start in range(0, len(emb), COPY_ROWS):
                f.write(np.ascontiguousarray(emb[start : start + COPY_ROWS]).tobytes())
    return ntotal


def build_flat_sharded(corpus: Corpus, dest: Path, encode: Callable[[list[str]], np.ndarray], params: dict,
                       shard_docs: int = 100_000, progress: Callable[[int, int], None] | None = None) -> Path:
    """Build (or finish building) the flat index of `corpus` into `dest`; `encode` maps texts to
    L2-normalised float32 rows. `params` key the build: a partial build with other params is started over."""
    if (dest / "DONE").is_file():
        return dest
    partial = dest.parent / f".{dest.name}.partial"
    stamp = json.dumps({**params, "shard_docs": shard_docs}, sort_keys=True)
    before = (partial / "PARAMS").read_text() if (partial / "PARAMS").is_file() else None
    if partial.is_dir() and before != stamp:
        shutil.rmtree(partial)
    (partial / "shards").mkdir(parents=True, exist_ok=True)
    (partial / "PARAMS").write_text(stamp)
    n = len(corpus)
    count = (n + shard_docs - 1) // shard_docs
    for i in range(count):
        path = shard_path(partial, i)
        if path.is_file():  # finished before a kill
            continue
        emb = np.ascontiguousarray(encode(list(corpus.texts(i * shard_docs, (i + 1) * shard_docs))), np.float32)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        os.replace(tmp, path)
        if progress:
            progress(i + 1, count)
    shards = [shard_path(partial, i) for i in range(count)]
    dim = int(np.load(shards[0], mmap_mode="r").shape[1])
    if write_flat_ip(shards, dim, partial / "index.faiss") != n:
        raise RuntimeError(f"{partial}: the shards hold a different number of rows than {corpus.path}")
    shutil.rmtree(partial / "shards")
    (partial / "DONE").write_text(json.dumps(params, sort_keys=True))
    try:
        os.replace(partial, dest)
    except OSError:  # another builder finished first
        if not (dest / "DONE").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return dest
