"""The search environment: a pool of Ray actors that every rollout worker searches through.

Each replica builds its retriever from the `search` config section and serves it through a
:class:`~piplay_ray.actors.search_service.SearchService` (micro-batching, caching, formatting, bad input; no Ray,
in search_service.py). Neither a replica nor the pool raises to a caller: failures come back as failed
:class:`~piplay_ray.actors.search_service.SearchResult` objects.
"""

from __future__ import annotations

import random

import ray

from piplay_ray.actors.search_service import SearchResult, SearchService, failed
from piplay_ray.config import FaultConfig, SearchConfig
from piplay_ray.retrieval import make_retriever


class SearchEnvImpl:
    """One replica (plain class; `SearchEnvActor` is its actor): builds its retriever from the `search` config
    section (or a factory) and serves SearchService."""

    def __init__(self, cfg, retriever_factory=None):
        retriever = retriever_factory() if retriever_factory else make_retriever(cfg)
        self.service = SearchService(retriever, cfg.topk, cfg.max_topk, cfg.max_query_chars,
                                     cfg.doc_token_budget, cfg.batch_window_ms, cfg.cache_size)

    async def search(self, queries: list[str], topk: int | None = None) -> list[SearchResult]:
        return await self.service.search(queries, topk)

    async def metrics(self) -> dict:
        return self.service.metrics()

    async def ready(self) -> bool:
        return True


SearchEnvActor = ray.remote(SearchEnvImpl)


class SearchEnvPool:
    """Handles to `cfg.replicas` search actors (the `search` config section; each restarted up to
    `fault.max_actor_restarts` times); picklable, so rollout workers can hold one.

    Requests go round-robin over the replicas. :meth:`search` never raises: a dead or unreachable replica
    yields failed results for that request.
    """

    def __init__(self, cfg: SearchConfig, fault: FaultConfig | None = None, replicas: int | None = None,
                 retriever_factory=None):
        self.cfg = cfg
        restarts = (fault or FaultConfig()).max_actor_restarts
        self.actors = [SearchEnvActor.options(num_cpus=cfg.num_cpus_per_replica, max_restarts=restarts,
                                     max_task_retries=0).remote(cfg, retriever_factory)
                       for _ in range(replicas or cfg.replicas)]
        self._next = random.randrange(len(self.actors))

    def wait_ready(self, timeout_s: float = 600) -> None:
        ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)

    def search_async(self, queries: list[str], topk: int | None = None):
        """An ObjectRef to the list of SearchResult (for callers that overlap search with other work)."""
        self._next = (self._next + 1) % len(self.actors)
        return self.actors[self._next].search.remote(list(queries), topk)

    def search(self, queries: list[str], topk: int | None = None, timeout_s: float | None = None) -> list[SearchResult]:
        timeout_s = timeout_s or self.cfg.timeout_s * (self.cfg.retries + 2) + 30
        try:
            return ray.get(self.search_async(queries, topk), timeout=timeout_s)
        except Exception as e:  # actor died, timed out: a failed tool call, not a dead rollout
            return [failed(q, f"search env unavailable: {type(e).__name__}: {e}") for q in queries]

    def metrics(self) -> dict:
        """Summed counters over replicas, plus each replica's own figures under ``replicas``."""
        per = ray.get([a.metrics.remote() for a in self.actors])
        total = {k: sum(m[k] for m in per) for k in ("requests", "queries", "cache_hits", "cache_misses", "failed",
                                                     "batches", "batched_queries", "retriever_errors", "qps")}
        total["max_batch"] = max(m["max_batch"] for m in per)
        total["mean_batch"] = total["batched_queries"] / total["batches"] if total["batches"] else 0.0
        looked_up = total["cache_hits"] + total["cache_misses"]
        total["cache_hit_rate"] = total["cache_hits"] / looked_up if looked_up else 0.0
        total["latency_p50_ms"] = max(m["latency_p50_ms"] for m in per)
        total["latency_p99_ms"] = max(m["latency_p99_ms"] for m in per)
        total["replicas"] = per
        return total

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
