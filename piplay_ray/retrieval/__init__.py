"""Retrievers behind one batched interface (base.py), one file per implementation, named in
`registry.RETRIEVERS`.

:func:`make_retriever` builds the one a :class:`~piplay_ray.config.SearchConfig` names; :func:`build_index`
is what ``piplay retriever index`` runs. A new retriever is a `Retriever` subclass in a file of its own (its
`from_config`, and `build_index` when it has a local index) and one line in `registry.RETRIEVERS`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from piplay_ray.registry import RETRIEVERS
from piplay_ray.retrieval.base import RetrievalError, Retriever

__all__ = ["RetrievalError", "Retriever", "build_index", "make_retriever"]


def make_retriever(cfg, show_progress: bool = False) -> Retriever:
    """The retriever for `cfg` (a SearchConfig); local indexes are built on first use and cached."""
    return RETRIEVERS.load(cfg.retriever).from_config(cfg, show_progress=show_progress)


def build_index(cfg) -> Path | None:
    """Build (or find) the index `cfg` names, with a progress bar; returns its folder (None: nothing to build)."""
    path = RETRIEVERS.load(cfg.retriever).build_index(cfg)
    if path is None:
        print(f"[piplay retriever] search.retriever={cfg.retriever}: the server owns the index, nothing to build",
              file=sys.stderr)
        return None
    print(f"[piplay retriever] {cfg.retriever} index: {path}", file=sys.stderr)
    print(path)
    return path
