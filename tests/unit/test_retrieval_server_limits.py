"""The retrieval server under abuse: request limits, wrong methods, stalled bodies, nested JSON, 200 clients."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading

import pytest
from helpers.runs import ROOT

from piplay_ray.retrieval.server import RetrievalServer

sys.path.insert(0, str(ROOT / "bench"))
from retrieval_server import TOPICS, load  # noqa: E402 - the bench's load driver, asserted on here


@pytest.fixture(scope="module")
def tiny_bm25(tmp_path_factory):
    from piplay_ray.retrieval.bm25 import BM25Retriever

    root = tmp_path_factory.mktemp("tiny_corpus")
    rows = [{"id": str(i), "title": f"{t.title()} {i}", "contents": f"The {t} number {i} is near {TOPICS[i % 5]}."}
            for i, t in enumerate(TOPICS * 4)]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return BM25Retriever(root / "c.jsonl", index_dir=str(root / "index"), max_topk=10)


class _Spy:
    """Counts calls and records which threads served them."""

    def __init__(self, inner):
        self.inner, self.corpus, self.max_topk = inner, inner.corpus, inner.max_topk
        self.calls, self.threads = 0, set()

    def search(self, queries, topk):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return self.inner.search(queries, topk)


@pytest.fixture
def served(tiny_bm25):
    servers = []

    def make(**kw):
        srv = RetrievalServer(_Spy(tiny_bm25), "127.0.0.1", 0, **kw)
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
    assert status == 405 and headers["Allow"] == "POST" and "use POST" in out["error"]
    status, headers, _ = _request(srv, "POST", "/health", b"{}")
    assert status == 405 and headers["Allow"] == "GET"
    assert _request(srv, "DELETE", "/retrieve")[0] == 405
    assert _request(srv, "GET", "/nope")[0] == 404
    assert _request(srv, "GET", "/health")[0] == 200


def test_deeply_nested_json_is_400_not_a_dropped_connection(served):
    srv = served()
    status, _, out = _request(srv, "POST", "/retrieve", b"[" * 200_000 + b"]" * 200_000)
    assert status == 400 and "nested" in out["error"]


def test_stalled_body_is_dropped_after_the_socket_timeout(served):
    """A client that announces 1000 bytes and sends 10 loses its connection, and the one worker is free again."""
    srv = served(workers=1, timeout_s=0.3)
    stalled = socket.create_connection(srv.server_address[:2], timeout=10)
    stalled.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"queries\"")
    status, _, out = _request(srv, "POST", "/retrieve", json.dumps({"queries": ["falcon"]}).encode())
    assert status == 200 and out["result"][0]
    assert stalled.recv(100) == b""  # closed by the server, not left hanging (10 s client timeout otherwise)
    stalled.close()


def test_200_parallel_clients_no_resets_all_correct_bounded_pool(served, tiny_bm25):
    """200 clients connect at once (a barrier), 3 keep-alive requests each; 16 workers serve them all."""
    srv = served(workers=16)
    clients, rounds = 200, 3
    want = {t: [d.id for d in docs] for t, docs in zip(TOPICS, tiny_bm25.search(TOPICS, 3), strict=True)}
    out = load(srv, want, clients, rounds, timeout_s=60)  # bench/retrieval_server.py's client swarm
    assert out["stuck"] == 0, "clients still running after 60 s"
    assert (out["resets"], out["errors"], out["wrong"]) == (0, 0, 0), out.get("first_error")
    assert out["requests_ok"] == clients * rounds
    assert srv.retriever.threads <= {f"retrieval-worker-{i}" for i in range(16)}
