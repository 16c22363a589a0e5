"""The search service: the micro-batching, caching, formatting front of one retriever (plain asyncio, no Ray;
the search env actors in actors/search_env.py each serve one).

Concurrent requests wait a short window (``batch_window_ms``) and go to the retriever as one batch, identical
in-flight queries are merged, repeated queries come from an LRU cache, and each result is formatted for the
agent (numbered documents with titles, each cut to ``doc_token_budget`` words). The service never raises to a
caller: bad input and retriever failures come back as :class:`SearchResult` with ``ok=False`` and an error
the agent loop can show the model and score.

Bad input, concretely: a query that is empty after cleaning (see :mod:`piplay_ray.retrieval.queries`) or is
not a string is a failed call ("empty query"); a long query is truncated to ``max_query_chars``; ``topk < 1``
fails every query of the request; ``topk > max_topk`` is clamped.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from piplay_ray.method.evidence import format_docs
from piplay_ray.records import Doc, Hop
from piplay_ray.retrieval.base import Retriever
from piplay_ray.retrieval.queries import check_topk, clean_query

MAX_BATCH = 256  # queries per retriever call; more wait for the next batch


# ------------------------------------------------------------------------------------------ formatting


@dataclass
class SearchResult:
    query: str  # as searched (cleaned); the raw query when it was rejected
    docs: list[Doc] = field(default_factory=list)  # contents already cut to the token budget
    text: str = ""  # what the agent sees inside <information>
    ok: bool = True
    error: str | None = None
    cached: bool = False

    def to_hop(self) -> Hop:
        return Hop(query=self.query, docs=list(self.docs), ok=self.ok, error=self.error)


def failed(query, error: str) -> SearchResult:
    """A failed search; the agent reads only the error's first line (a Ray error's text runs to a traceback)."""
    query = query if isinstance(query, str) else repr(query)
    error = (error.strip().splitlines() or [""])[0][:300]
    return SearchResult(query=query, ok=False, error=error, text=f"Search failed: {error}")


# ------------------------------------------------------------------------------------------ service


class SearchService:
    """Micro-batching, caching, formatting front of one retriever. All methods run on one event loop."""

    def __init__(self, retriever: Retriever, topk: int = 3, max_topk: int = 50, max_query_chars: int = 512,
                 doc_token_budget: int = 128, batch_window_ms: float = 5.0, cache_size: int = 10000):
        self.retriever = retriever
        self.topk, self.max_topk, self.max_query_chars = topk, max_topk, max_query_chars
        self.budget, self.window_s, self.cache_size = doc_token_budget, batch_window_ms / 1000, cache_size
        self._cache: OrderedDict[tuple[str, int], SearchResult] = OrderedDict()
        self._pending: dict[tuple[str, int], asyncio.Future] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._m = {"requests": 0, "queries": 0, "cache_hits": 0, "cache_misses": 0, "failed": 0, "batches": 0,
                   "batched_queries": 0, "max_batch": 0, "retriever_errors": 0}
        self._latency: deque[float] = deque(maxlen=10000)
        self._batch_sizes: deque[int] = deque(maxlen=10000)
        self._t0: float | None = None

    async def search(self, queries: list[str], topk: int | None = None) -> list[SearchResult]:
        """One result per query, in order. Never raises."""
        start = time.perf_counter()
        self._t0 = self._t0 or start
        if isinstance(queries, str):
            queries = [queries]
        self._m["requests"] += 1
        self._m["queries"] += len(queries)
        try:
            k = check_topk(self.topk if topk is None else topk, self.max_topk)
        except ValueError as e:
            self._m["failed"] += len(queries)
            return [failed(q, str(e)) for q in queries]
        results: list[SearchResult | None] = [None] * len(queries)
        waits: list[tuple[int, asyncio.Future]] = []
        for i, raw in enumerate(queries):
            try:
                q = clean_query(raw, self.max_query_chars)
            except TypeError as e:
                results[i] = failed(raw, str(e))
                continue
            if not q:
                results[i] = failed(raw, "empty query")
                continue
            hit = self._cache.get((q, k))
            if hit is not None:
                self._cache.move_to_end((q, k))
                self._m["cache_hits"] += 1
                results[i] = SearchResult(hit.query, hit.docs, hit.text, cached=True)
                continue
            self._m["cache_misses"] += 1
            fut = self._pending.get((q, k))
            if fut is None:
                fut = self._pending[(q, k)] = asyncio.get_running_loop().create_future()
            waits.append((i, fut))
        if waits:
            self._ensure_loop().set()
            for i, fut in waits:
                results[i] = await asyncio.shield(fut)
        self._m["failed"] += sum(not r.ok for r in results)
        self._latency.append(time.perf_counter() - start)
        return results

    def _ensure_loop(self) -> asyncio.Event:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        return self._wake

    async def _batch_loop(self) -> None:
        """One retriever call at a time; requests that arrive meanwhile form the next batch."""
        while True:
            await self._wake.wait()
            if self.window_s:
                await asyncio.sleep(self.window_s)
            keys = list(self._pending)[:MAX_BATCH]
            futs = [self._pending.pop(key) for key in keys]
            if not self._pending:
                self._wake.clear()
            if keys:
                await self._run_batch(keys, futs)

    async def _run_batch(self, keys: list[tuple[str, int]], futs: list[asyncio.Future]) -> None:
        kmax = max(k for _, k in keys)
        self._m["batches"] += 1
        self._m["batched_queries"] += len(keys)
        self._m["max_batch"] = max(self._m["max_batch"], len(keys))
        self._batch_sizes.append(len(keys))
        try:
            docs = await asyncio.to_thread(self.retriever.search, [q for q, _ in keys], kmax)
            if len(docs) != len(keys):
                raise RuntimeError(f"retriever returned {len(docs)} result lists for {len(keys)} queries")
        except Exception as e:  # a failed batch fails its callers, not the service
            self._m["retriever_errors"] += 1
            for (q, _), fut in zip(keys, futs, strict=True):
                if not fut.done():
                    fut.set_result(failed(q, f"{type(e).__name__}: {e}"))
            return
        for (q, k), found, fut in zip(keys, docs, futs, strict=True):
            cut, text = format_docs(found[:k], self.budget)
            res = SearchResult(query=q, docs=cut, text=text)
            if self.cache_size:
                self._cache[(q, k)] = res
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            if not fut.done():
                fut.set_result(res)

    def metrics(self) -> dict:
        m = dict(self._m)
        lat = np.asarray(self._latency) * 1000 if self._latency else np.zeros(1)
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        looked_up = m["cache_hits"] + m["cache_misses"]
        m.update(
            qps=m["queries"] / elapsed if elapsed else 0.0,
            latency_p50_ms=float(np.percentile(lat, 50)),
            latency_p99_ms=float(np.percentile(lat, 99)),
            mean_batch=m["batched_queries"] / m["batches"] if m["batches"] else 0.0,
            cache_hit_rate=m["cache_hits"] / looked_up if looked_up else 0.0,
            cache_entries=len(self._cache),
        )
        return m
