"""Retrievers behind one batched interface (base.py); one file per implementation.

:func:`make_retriever` builds the one a :class:`~piplay_ray.config.SearchConfig` names; :func:`build_index`
is what ``piplay retriever index`` runs.
"""

from __future__ import annotations

from pathlib import Path

from piplay_ray.retrieval.base import RetrievalError, Retriever

__all__ = ["RetrievalError", "Retriever", "build_index", "make_retriever"]


def make_retriever(cfg, show_progress: bool = False) -> Retriever:
    """The retriever for `cfg` (a SearchConfig); local indexes are built on first use and cached."""
    from piplay_ray.assets import resolve_corpus

    common = {"max_topk": cfg.max_topk, "max_query_chars": cfg.max_query_chars}
    if cfg.retriever == "bm25":
        from piplay_ray.retrieval.bm25 import BM25Retriever

        return BM25Retriever(resolve_corpus(cfg.corpus), cfg.index_dir, show_progress=show_progress, **common)
    if cfg.retriever == "dense":
        from piplay_ray.retrieval.dense import DenseRetriever

        return DenseRetriever(resolve_corpus(cfg.corpus), cfg.encoder, cfg.query_prefix, cfg.passage_prefix,
                              cfg.faiss_index, cfg.index_dir, show_progress=show_progress,
                              shard_docs=cfg.index_shard_docs, **common)
    if cfg.retriever == "http":
        from piplay_ray.retrieval.http import HttpRetriever

        return HttpRetriever(cfg.url, cfg.timeout_s, cfg.retries, cfg.backoff_s, **common)
    raise ValueError(f"search.retriever must be bm25, dense or http, got {cfg.retriever!r}")


def build_index(cfg) -> Path | None:
    """Build (or find) the index `cfg` names, with a progress bar; returns its folder (None for http)."""
    import sys

    from piplay_ray.assets import resolve_corpus
    from piplay_ray.retrieval.corpus import Corpus

    if cfg.retriever == "http":
        print("[piplay retriever] search.retriever=http: the server owns the index, nothing to build",
              file=sys.stderr)
        return None
    corpus = Corpus(resolve_corpus(cfg.corpus))
    if cfg.retriever == "bm25":
        from piplay_ray.retrieval.bm25 import build_bm25_index

        path = build_bm25_index(corpus, cfg.index_dir, show_progress=True)
    else:
        from piplay_ray.retrieval.dense import build_dense_index

        path = build_dense_index(corpus, cfg.encoder, cfg.passage_prefix, cfg.faiss_index, cfg.index_dir,
                                 show_progress=True, shard_docs=cfg.index_shard_docs)
    print(f"[piplay retriever] {cfg.retriever} index of {len(corpus)} documents: {path}", file=sys.stderr)
    print(path)
    return path
