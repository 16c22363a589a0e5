"""Dense retrieval: a sentence encoder (local path or hub id) plus a FAISS inner-product index.

Embeddings are L2-normalised, so inner product is cosine similarity. ``flat`` is exact; ``hnsw`` and
``ivf`` trade a little recall for speed on large corpora. The index is cached beside the corpus, keyed by
corpus checksum, encoder, prefixes and index type, and loaded memory-mapped where FAISS supports it.
e5-style encoders need their ``query: `` / ``passage: `` prefixes (config ``query_prefix`` /
``passage_prefix``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import numpy as np

from piplay_ray.assets import encoder_path, resolve_corpus
from piplay_ray.records import Doc
from piplay_ray.retrieval.base import Retriever
from piplay_ray.retrieval.corpus import Corpus, build_once, index_folder
from piplay_ray.retrieval.queries import check_topk, clean_query

VERSION = 1
SMALL_BATCH = 8  # up to this many queries per call run single-threaded (see _few_threads)


@contextlib.contextmanager
def _few_threads(active: bool):
    """Run a small batch on one thread. Splitting a few queries over threads only adds synchronisation,
    and on a busy host the spin-waits dominate: measured on 2 shared cores, one query took 85 ms to encode
    and 80 ms to search with 2 threads, 17 ms and 0.6 ms with one."""
    if not active:
        yield
        return
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def load_encoder(encoder: str, device: str | None = None):
    """The sentence encoder, on the GPU when there is one, in float16 there: an e5-base-shaped encoder made
    1,189 passages/s on an H200 in float32 and 3,328 in float16 (wiki-18's 21M passages in 4.9 h vs 1.8 h;
    on this project's 2 CPU cores, ~1.3/s). Search-R1 serves its E5 in float16 too."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = SentenceTransformer(encoder_path(encoder), device=device)
    return model.half() if torch.device(device).type == "cuda" else model


def encode(model, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=show_progress)
    return np.ascontiguousarray(emb, dtype=np.float32)


def _faiss_index(kind: str, dim: int, n: int):
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 200, 128
        return index
    if kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS wants ~39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = max(1, nlist // 8)
        return index
    raise ValueError(f"faiss_index must be flat, hnsw or ivf, got {kind!r}")


def build_dense_index(corpus: Corpus, encoder: str = "builtin:minilm", passage_prefix: str = "",
                      faiss_index: str = "flat", index_dir: str | None = None, model=None,
                      batch_size: int = 64, show_progress: bool = True, shard_docs: int = 100_000) -> Path:
    """Encode every document and write ``index.faiss``; returns the (cached) index folder. A flat index is
    built in resumable shards (shards.py); hnsw and ivf need every vector in memory to build."""
    import faiss

    params = {"v": VERSION, "encoder": encoder_path(encoder), "passage_prefix": passage_prefix,
              "faiss_index": faiss_index}
    dest = index_folder(corpus, "dense", params, index_dir)
    if faiss_index == "flat":
        from piplay_ray.retrieval.shards import build_flat_sharded

        enc = None

        def encode_shard(texts: list[str]) -> np.ndarray:
            nonlocal enc
            enc = enc or model or load_encoder(encoder)
            return encode(enc, [passage_prefix + t for t in texts], batch_size=batch_size)

        def progress(done: int, total: int) -> None:
            if show_progress:
                print(f"[piplay retriever] dense index: shard {done}/{total} encoded", file=sys.stderr, flush=True)

        return build_flat_sharded(corpus, dest, encode_shard, params, shard_docs, progress)

    def build(tmp: Path) -> None:
        enc = model or load_encoder(encoder)
        texts = [passage_prefix + t for t in corpus.texts()]
        emb = encode(enc, texts, batch_size=batch_size, show_progress=show_progress)
        index = _faiss_index(faiss_index, emb.shape[1], len(emb))
        if not index.is_trained:
            index.train(emb)
        index.add(emb)
        faiss.write_index(index, str(tmp / "index.faiss"))

    return build_once(dest, build, params)


class DenseRetriever(Retriever):
    @classmethod
    def from_config(cls, cfg, show_progress: bool = False) -> DenseRetriever:
        return cls(resolve_corpus(cfg.corpus), cfg.encoder, cfg.query_prefix, cfg.passage_prefix, cfg.faiss_index,
                   cfg.index_dir, show_progress=show_progress, shard_docs=cfg.index_shard_docs,
                   max_topk=cfg.max_topk, max_query_chars=cfg.max_query_chars)

    @classmethod
    def build_index(cls, cfg) -> Path:
        return build_dense_index(Corpus(resolve_corpus(cfg.corpus)), cfg.encoder, cfg.passage_prefix,
                                 cfg.faiss_index, cfg.index_dir, show_progress=True, shard_docs=cfg.index_shard_docs)

    def __init__(self, corpus: str | os.PathLike | Corpus, encoder: str = "builtin:minilm", query_prefix: str = "",
                 passage_prefix: str = "", faiss_index: str = "flat", index_dir: str | None = None,
                 max_topk: int = 50, max_query_chars: int = 512, show_progress: bool = False,
                 shard_docs: int = 100_000):
        import faiss

        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
        self.max_topk, self.max_query_chars, self.query_prefix = max_topk, max_query_chars, query_prefix
        self.encoder = load_encoder(encoder)
        self.index_path = build_dense_index(self.corpus, encoder, passage_prefix, faiss_index, index_dir,
                                            model=self.encoder, show_progress=show_progress, shard_docs=shard_docs)
        path = str(self.index_path / "index.faiss")
        try:
            self.index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # index types without mmap support
            self.index = faiss.read_index(path)
        if self.index.ntotal != len(self.corpus):
            raise RuntimeError(f"{path}: index has {self.index.ntotal} vectors, the corpus {len(self.corpus)} "
                               "documents; delete the index folder to rebuild it")

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        k = min(check_topk(topk, self.max_topk), len(self.corpus))
        cleaned = [clean_query(q, self.max_query_chars) for q in queries]
        out: list[list[Doc]] = [[] for _ in queries]
        live = [i for i, q in enumerate(cleaned) if q]
        if not live:
            return out
        with _few_threads(len(live) <= SMALL_BATCH):
            emb = encode(self.encoder, [self.query_prefix + cleaned[i] for i in live])
            scores, rows = self.index.search(emb, k)
        for i, row, score in zip(live, rows, scores, strict=True):
            out[i] = [self._doc(r, s) for r, s in zip(row, score, strict=True) if r >= 0]
        return out

    def _doc(self, row: int, score: float) -> Doc:
        doc = self.corpus[int(row)]
        doc.score = float(score)
        return doc


if __name__ == "__main__":  # python -m piplay_ray.retrieval.dense corpus.jsonl: build the flat MiniLM index
    print(build_dense_index(Corpus(sys.argv[1])))
