"""The retrieval server under abuse: request limits, wrong methods, stalled bodies, slow clients, nested JSON,
overload, huge queries, 200 clients."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time

import pytest
from helpers.runs import ROOT

from piplay_ray.retrieval.server import RetrievalServer

sys.path.insert(0, str(ROOT / "bench"))
from retrieval_server import TOPICS, load, slow_clients, timed_request  # noqa: E402 - the bench's drivers


@pytest.fixture(scope="module")
def tiny_bm25(tmp_path_factory):
    from piplay_ray.retrieval.bm25 import BM25Retriever

    root = tmp_path_factory.mktemp("tiny_corpus")
    rows = [{"id": str(i), "title": f"{t.title()} {i}", "contents": f"The {t} number {i} is near {TOPICS[i % 5]}."}
            for i, t in enumerate(TOPICS * 4)]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return BM25Retriever(root / "c.jsonl", index_dir=str(root / "index"), max_topk=10)


class _Spy:
    """Counts calls, records which threads served them and the longest query it was handed; `delay_s` makes
    every search that slow."""

    def __init__(self, inner, delay_s: float = 0.0):
        self.inner, self.corpus, self.max_topk = inner, inner.corpus, inner.max_topk
        self.max_query_chars, self.delay_s = inner.max_query_chars, delay_s
        self.calls, self.threads, self.longest = 0, set(), 0

    def search(self, queries, topk):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        self.longest = max([self.longest, *map(len, queries)])
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner.search(queries, topk)


@pytest.fixture
def served(tiny_bm25):
    servers = []

    def make(delay_s=0.0, **kw):
        srv = RetrievalServer(_Spy(tiny_bm25, delay_s), "127.0.0.1", 0, **kw)
        srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _request(srv, method, path, body=b"", timeout=10.0):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read() or b"null")
    finally:
        conn.close()


def test_too_many_queries_is_413_with_limit_and_never_searched(served):
    srv = served(max_queries=64)
    body = json.dumps({"queries": ["river"] * 20_000, "topk": 10}).encode()
    status, _, out = _request(srv, "POST", "/retrieve", body)
    assert status == 413 and "20000 queries" in out["error"] and "64" in out["error"]
    assert srv.retriever.calls == 0
    status, _, out = _request(srv, "POST", "/retrieve", json.dumps({"queries": ["river"] * 64}).encode())
    assert status == 200 and len(out["result"]) == 64


def test_topk_over_limit_is_400_naming_it(served):
    srv = served()
    status, _, out = _request(srv, "POST", "/retrieve", json.dumps({"queries": ["comet"], "topk": 11}).encode())
    assert status == 400 and "limit is 10" in out["error"] and srv.retriever.calls == 0
    status, _, out = _request(srv, "POST", "/retrieve", json.dumps({"queries": ["comet"], "topk": 10}).encode())
    assert status == 200 and 1 <= len(out["result"][0]) <= 10


def test_wrong_method_is_405_with_allow(served):
    srv = served()
    status, headers, out = _request(srv, "GET", "/retrieve")
    assert status == 405 and headers["Allow"] == "POST, OPTIONS" and "use POST" in out["error"]
    status, headers, _ = _request(srv, "POST", "/health", b"{}")
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS"
    assert _request(srv, "DELETE", "/retrieve")[0] == 405
    assert _request(srv, "GET", "/nope")[0] == 404
    assert _request(srv, "GET", "/health")[0] == 200


def test_head_and_options_are_answered(served):
    srv = served()
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    try:
        conn.request("HEAD", "/health")
        r = conn.getresponse()
        assert r.status == 200 and int(r.getheader("Content-Length")) > 0 and r.read() == b""  # headers only
        conn.request("OPTIONS", "/retrieve")
        r = conn.getresponse()
        assert r.status == 204 and r.getheader("Allow") == "POST, OPTIONS" and r.read() == b""
        conn.request("HEAD", "/retrieve")  # the same keep-alive connection still serves
        r = conn.getresponse()
        assert r.status == 405 and r.getheader("Allow") == "POST, OPTIONS"
        r.read()
    finally:
        conn.close()


def test_slow_clients_are_cut_at_the_whole_request_deadline_and_never_starve_a_normal_one(served):
    """20 clients trickle a header a byte every 0.4 s (a per-read timeout never fires); a normal request beside
    them is answered at once, and each slow one is cut once the whole-request deadline (1 s) passes."""
    srv = served(timeout_s=1.0)
    stop = slow_clients(srv, 20, interval_s=0.4)
    try:
        status, ms = timed_request(srv, json.dumps({"queries": ["falcon"]}).encode(), timeout_s=10)
        assert status == 200 and ms < 2000
        probe = socket.create_connection(srv.server_address[:2], timeout=10)
        t = time.monotonic()
        for b in b"POST /retrieve HTTP/1.1\r\n":
            try:
                probe.sendall(bytes([b]))
            except OSError:
                break
            time.sleep(0.2)
        assert probe.recv(100) == b"" and time.monotonic() - t < 4  # dropped near the 1 s deadline
        probe.close()
    finally:
        stop.set()


def test_overload_is_503_with_retry_after(served):
    """More requests waiting for the search than `max_pending`, or more connections than `max_connections`:
    503 with Retry-After at once, never a hang."""
    srv = served(delay_s=0.6, max_pending=1)
    body = json.dumps({"queries": ["comet"]}).encode()
    first = threading.Thread(target=timed_request, args=(srv, body))
    first.start()
    time.sleep(0.2)  # the first one is searching
    status, headers, out = _request(srv, "POST", "/retrieve", body)
    first.join()
    assert status == 503 and headers["Retry-After"] == "1" and "busy" in out["error"]
    full = served(max_connections=1)
    held = socket.create_connection(full.server_address[:2], timeout=10)  # takes the only connection
    time.sleep(0.2)
    status, headers, _ = _request(full, "GET", "/health")
    assert status == 503 and headers["Retry-After"] == "1"
    held.close()


def test_queries_are_cleaned_before_the_search_lock(served):
    """A 10 MB query is cut to `max_query_chars` before it is searched (the retriever, under the lock, only
    sees the cut), and a request sent meanwhile is not held up behind the cleaning."""
    srv = served()
    status, _, out = _request(srv, "POST", "/retrieve", json.dumps({"queries": ["river " * 1_700_000]}).encode(),
                              timeout=60)
    assert status == 200 and out["result"][0] and srv.retriever.longest <= srv.max_query_chars


def test_deeply_nested_json_is_400_not_a_dropped_connection(served):
    srv = served()
    status, _, out = _request(srv, "POST", "/retrieve", b"[" * 200_000 + b"]" * 200_000)
    assert status == 400 and "nested" in out["error"]


def test_stalled_body_is_dropped_after_the_socket_timeout(served):
    """A client that announces 1000 bytes and sends 10 loses its connection, and the one worker is free again."""
    srv = served(timeout_s=0.3)
    stalled = socket.create_connection(srv.server_address[:2], timeout=10)
    stalled.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"queries\"")
    status, _, out = _request(srv, "POST", "/retrieve", json.dumps({"queries": ["falcon"]}).encode())
    assert status == 200 and out["result"][0]
    assert stalled.recv(100) == b""  # closed by the server, not left hanging (10 s client timeout otherwise)
    stalled.close()


def test_200_parallel_clients_no_resets_all_correct_bounded_pool(served, tiny_bm25):
    """200 clients connect at once (a barrier), 3 keep-alive requests each; a thread per connection serves them."""
    srv = served()
    clients, rounds = 200, 3
    want = {t: [d.id for d in docs] for t, docs in zip(TOPICS, tiny_bm25.search(TOPICS, 3), strict=True)}
    out = load(srv, want, clients, rounds, timeout_s=60)  # bench/retrieval_server.py's client swarm
    assert out["stuck"] == 0, "clients still running after 60 s"
    assert (out["resets"], out["errors"], out["wrong"]) == (0, 0, 0), out.get("first_error")
    assert out["requests_ok"] == clients * rounds
    assert all(name.startswith("retrieval-connection-") for name in srv.retriever.threads)
