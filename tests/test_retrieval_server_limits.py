"""The retrieval server under abuse: request limits, wrong methods, stalled bodies, nested JSON, 200 clients."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest

from piplay_ray.retrieval.server import RetrievalServer

TOPICS = ["river", "mountain", "comet", "violin", "glacier", "harbor", "orchid", "falcon"]


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
    barrier, lock = threading.Barrier(clients), threading.Lock()
    results = {"ok": 0, "wrong": 0, "errors": []}

    def client(i):
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
        barrier.wait()
        try:
            for r in range(rounds):
                q = TOPICS[(i + r) % len(TOPICS)]
                conn.request("POST", "/retrieve", body=json.dumps({"queries": [q], "topk": 3}))
                resp = conn.getresponse()
                got = [d["id"] for d in json.loads(resp.read())["result"][0]]
                with lock:
                    results["ok" if resp.status == 200 and got == want[q] else "wrong"] += 1
                if resp.getheader("Connection") == "close":  # the server asked us to make room
                    conn.close()
        except Exception as e:  # noqa: BLE001 - counted and reported below
            with lock:
                results["errors"].append(f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "clients still running after 60 s"
    assert results["errors"] == [] and results["wrong"] == 0
    assert results["ok"] == clients * rounds
    assert srv.retriever.threads <= {f"retrieval-worker-{i}" for i in range(16)}
