"""The search env: formatting and truncation, micro-batching, caching, bad input (no Ray), then the Ray pool."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from piplay_ray.actors.search_service import SearchService
from piplay_ray.method.evidence import format_docs, truncate_words
from piplay_ray.records import Doc
from piplay_ray.retrieval.base import RetrievalError, Retriever


class Echo(Retriever):
    """A fake: document i of query q is titled "q#i"; records every batch it was called with."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[list[str], int]] = []
        self.fail = fail

    def search(self, queries, topk):
        self.calls.append((list(queries), topk))
        if self.fail:
            raise RetrievalError("server down")
        return [[Doc(f"{q}#{i}", f"{q}#{i}", f'"{q}#{i}"\none two three four five', 1.0 / (i + 1))
                 for i in range(topk)] for q in queries]


def test_format_and_truncate():
    assert truncate_words("a b  c d", 3) == "a b c ..."
    assert truncate_words("a b", 3) == "a b"
    docs = [Doc("1", "Alpha", '"Alpha"\none two three', 2.0), Doc("2", "Beta", "no title line here", 1.0)]
    cut, text = format_docs(docs, 2)
    assert text == "Doc 1 (Title: Alpha) one two ...\nDoc 2 (Title: Beta) no title ..."
    assert [(d.id, d.score) for d in cut] == [("1", 2.0), ("2", 1.0)]
    assert format_docs([], 5) == ([], "No results found.")


def test_concurrent_requests_share_batches_and_cache():
    fake = Echo()

    async def run():
        svc = SearchService(fake, topk=2, doc_token_budget=3, batch_window_ms=20)
        many = await asyncio.gather(*(svc.search([f"q{i}", "shared"]) for i in range(20)))
        again = await svc.search(["q3", "new"], topk=1)
        return svc, many, again

    svc, many, again = asyncio.run(run())
    for i, res in enumerate(many):  # each caller its own results, in order
        assert [r.query for r in res] == [f"q{i}", "shared"]
        assert [d.id for d in res[0].docs] == [f"q{i}#0", f"q{i}#1"]
        assert res[0].text == f"Doc 1 (Title: q{i}#0) one two three ...\nDoc 2 (Title: q{i}#1) one two three ..."
    assert len(fake.calls) == 2 and sorted(fake.calls[0][0]) == sorted([f"q{i}" for i in range(20)] + ["shared"])
    assert again[0].cached is False and [d.id for d in again[0].docs] == ["q3#0"]  # cache keyed by topk
    assert fake.calls[1] == (["q3", "new"], 1)
    m = svc.metrics()
    assert m["max_batch"] == 21 and m["batches"] == 2 and m["queries"] == 42 and m["requests"] == 21
    asyncio.run(_cached_check(svc))


async def _cached_check(svc):
    res = await svc.search(["q3"])
    assert res[0].cached and res[0].docs[0].id == "q3#0"
    assert svc.metrics()["cache_hits"] == 1


def test_cache_is_lru_bounded():
    fake = Echo()

    async def run():
        svc = SearchService(fake, topk=1, batch_window_ms=0, cache_size=2)
        for q in ["a", "b", "a", "c", "a", "b"]:
            await svc.search([q])
        return svc.metrics()

    m = asyncio.run(run())
    # a b (miss miss) a (hit) c (miss; evicts b) a (hit) b (miss)
    assert (m["cache_hits"], m["cache_misses"], m["cache_entries"]) == (2, 4, 2)
    assert m["batches"] == 4


def test_bad_input_is_a_failed_call_not_an_exception():
    fake = Echo()

    async def run():
        svc = SearchService(fake, topk=2, max_topk=5, max_query_chars=20, batch_window_ms=0)
        a = await svc.search(["", "  \x00\t", None, "ok\udcff\x1b query", "long " * 50])
        b = await svc.search(["x"], topk=0)
        c = await svc.search(["y"], topk=99)
        d = await svc.search("single string")
        return a, b, c, d

    a, b, c, d = asyncio.run(run())
    assert [r.ok for r in a] == [False, False, False, True, True]
    assert a[0].error == "empty query" and a[0].text == "Search failed: empty query"
    assert a[3].query == "ok query" and a[4].query == "long long long long"  # cleaned, truncated
    assert not b[0].ok and "topk" in b[0].error
    assert c[0].ok and len(c[0].docs) == 5  # clamped to max_topk
    assert d[0].query == "single string" and d[0].ok
    assert fake.calls[0][0] == ["ok query", "long long long long"]


def test_retriever_failure_reaches_every_caller_as_failed_result():
    async def run():
        svc = SearchService(Echo(fail=True), topk=1, batch_window_ms=5)
        res = await asyncio.gather(*(svc.search([f"q{i}"]) for i in range(5)))
        return res, svc.metrics()

    res, m = asyncio.run(run())
    assert all(not r[0].ok and "server down" in r[0].error for r in res)
    assert m["retriever_errors"] == 1 and m["failed"] == 5 and m["cache_entries"] == 0  # failures not cached


def test_a_multi_line_error_reaches_the_model_as_its_first_line():
    """A Ray error's text runs to a traceback; the agent's context gets one line of it, the Hop the same."""
    from piplay_ray.method.agent import search_once

    class Broken(Retriever):
        def search(self, queries, topk):
            raise RetrievalError("ray::SearchEnv.search() failed\nTraceback (most recent call last):\n  File x")

    async def run():
        return (await SearchService(Broken(), topk=1).search(["q"]))[0]

    res = asyncio.run(run())
    assert res.error == "RetrievalError: ray::SearchEnv.search() failed" and "\n" not in res.text

    class Raising:
        async def search(self, query, topk=None):
            raise RuntimeError("actor died\n\nTraceback:\n  line 1\n  line 2")

    hop, text = asyncio.run(search_once(Raising(), "q"))
    assert text == "Search failed: RuntimeError: actor died" and hop.error == "RuntimeError: actor died"


# ------------------------------------------------------------------------------------------ Ray pool


def test_pool_64_concurrent_callers_get_their_own_results(ray_local, corpus_path):
    from piplay_ray.actors.search_env import SearchEnvPool
    from piplay_ray.config import SearchConfig
    from piplay_ray.retrieval.bm25 import BM25Retriever

    cfg = SearchConfig(retriever="bm25", corpus=corpus_path, topk=3, batch_window_ms=20, replicas=1,
                       num_cpus_per_replica=0.5, doc_token_budget=16)
    local = BM25Retriever(corpus_path)
    titles = [local.corpus[i * 97].title for i in range(64)]
    want = local.search(titles, 3)
    pool = SearchEnvPool(cfg)
    pool.wait_ready(timeout_s=300)
    barrier = threading.Barrier(64)

    def caller(i):
        barrier.wait()
        return pool.search([titles[i]])

    with ThreadPoolExecutor(64) as ex:
        got = list(ex.map(caller, range(64)))
    for i, res in enumerate(got):
        assert len(res) == 1 and res[0].ok and res[0].query == titles[i]
        assert [d.id for d in res[0].docs] == [d.id for d in want[i]]
        assert [d.score for d in res[0].docs] == pytest.approx([d.score for d in want[i]])
        assert all(len(d.contents.split()) <= 17 for d in res[0].docs)  # 16 words + " ..."
    m = pool.metrics()
    print({k: v for k, v in m.items() if k != "replicas"})
    assert m["queries"] == 64 and m["failed"] == 0
    assert m["max_batch"] > 1 and m["batches"] < 64  # concurrent callers were batched

    repeat = pool.search([titles[0]])
    assert repeat[0].cached and pool.metrics()["cache_hits"] >= 1

    pool.shutdown()


def test_pool_with_dead_replica_reports_failures(ray_local):
    import sys

    from piplay_ray.actors.search_env import SearchEnvPool
    from piplay_ray.config import FaultConfig, SearchConfig

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship the fake to the actor
    pool = SearchEnvPool(SearchConfig(num_cpus_per_replica=0), FaultConfig(max_actor_restarts=0), retriever_factory=Echo)
    pool.wait_ready(timeout_s=120)
    assert pool.search(["hello"])[0].docs[0].id == "hello#0"
    ray_local.kill(pool.actors[0], no_restart=True)
    out = pool.search(["hello", "again"], timeout_s=30)
    assert [r.ok for r in out] == [False, False] and "search env unavailable" in out[0].error
    pool.shutdown()
