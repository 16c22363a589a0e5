"""The Search-R1-compatible server and the HTTP client: same answers as in-process, retries, failures."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from helpers.search import serve_on_any_port

from piplay_ray.retrieval.base import RetrievalError
from piplay_ray.retrieval.http import HttpRetriever
from piplay_ray.retrieval.server import RetrievalServer


@pytest.fixture(scope="module")
def bm25(corpus_path):
    from piplay_ray.retrieval.bm25 import BM25Retriever

    return BM25Retriever(corpus_path)


@pytest.fixture(scope="module")
def server(bm25):
    srv = RetrievalServer(bm25, "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


QUERIES = ["Photosynthesis", "who painted the Mona Lisa", "speed of light in vacuum", "", "Nebula"]


def test_client_matches_in_process_retriever(server, bm25):
    client = HttpRetriever(server.url, timeout_s=10, retries=0)
    assert client.health()["docs"] == len(bm25.corpus)
    want, got = bm25.search(QUERIES, 5), client.search(QUERIES, 5)
    assert got == want  # ids, titles, contents and scores (float32 -> JSON -> float is exact)
    assert got[3] == [] and got[0][0].title == "Photosynthesis"


def test_wire_format_is_search_r1(server):
    body = {"queries": ["Nebula"], "topk": 2, "return_scores": True}
    out = requests.post(server.url + "/retrieve", json=body, timeout=10).json()["result"]
    assert len(out) == 1 and len(out[0]) == 2
    assert set(out[0][0]) == {"document", "score"} and {"id", "contents"} <= set(out[0][0]["document"])
    bare = requests.post(server.url + "/retrieve", json={**body, "return_scores": False}, timeout=10).json()
    assert bare["result"][0][0] == out[0][0]["document"]  # Search-R1: bare documents without scores


@pytest.mark.parametrize("body,status", [
    ({"queries": "x", "topk": 0}, 400), ({"queries": [1, 2]}, 400), ({"topk": 3}, 400), ([1], 400),
])
def test_server_rejects_bad_requests(server, body, status):
    r = requests.post(server.url + "/retrieve", json=body, timeout=10)
    assert r.status_code == status and "error" in r.json()
    assert requests.post(server.url + "/retrieve", data=b"{not json", timeout=10).status_code == 400
    assert requests.get(server.url + "/nope", timeout=10).status_code == 404


def test_client_rejects_bad_topk_without_calling():
    client = HttpRetriever("http://127.0.0.1:9", retries=0)
    with pytest.raises(ValueError):
        client.search(["x"], 0)
    assert client.search(["", " "], 3) == [[], []]  # nothing to send


class _Flaky(BaseHTTPRequestHandler):
    """Answers 500 to the first `fails` POSTs, then a valid one-document result."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.calls += 1
        if self.server.calls <= self.server.fails:
            code, body = 500, {"error": "boom"}
        else:
            code, body = 200, {"result": [[{"document": {"id": "7", "contents": '"T"\nbody'}, "score": 1.5}]]}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.parametrize("fails,ok", [(2, True), (5, False)])
def test_client_retries_5xx_then_reports(fails, ok):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    srv.calls, srv.fails = 0, fails
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = HttpRetriever(f"http://127.0.0.1:{srv.server_address[1]}", retries=2, backoff_s=0.01)
        if ok:
            [[doc]] = client.search(["q"], 3)
            assert (doc.id, doc.title, doc.contents, doc.score) == ("7", "T", '"T"\nbody', 1.5)
            assert srv.calls == 3
        else:
            with pytest.raises(RetrievalError, match="after 3 attempts"):
                client.search(["q"], 3)
            assert srv.calls == 3  # 1 try + 2 retries
    finally:
        srv.shutdown()
        srv.server_close()


def test_killed_server_gives_reported_failures_not_crashes(corpus_path, tmp_path):
    """`piplay retriever serve` in a subprocess, searched through the search env, killed mid-run."""
    import asyncio

    from piplay_ray.actors.search_service import SearchService

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"search:\n  retriever: bm25\n  corpus: {corpus_path}\n")
    proc, url = serve_on_any_port(cfg)
    try:
        client = HttpRetriever(url, timeout_s=5, retries=2, backoff_s=0.05)
        assert client.health()["status"] == "ok"

        async def run():
            svc = SearchService(client, topk=3, batch_window_ms=2, cache_size=0)
            before = await asyncio.gather(*(svc.search([f"river {i}"]) for i in range(8)))
            proc.kill()
            proc.wait()
            after = await asyncio.gather(*(svc.search([f"mountain {i}"]) for i in range(8)))
            return before, after, svc.metrics()

        before, after, m = asyncio.run(run())
        assert all(r[0].ok and r[0].docs for r in before)
        assert all(not r[0].ok and "after 3 attempts" in r[0].error for r in after)
        assert all(r[0].text.startswith("Search failed:") for r in after)
        assert m["retriever_errors"] >= 1 and m["failed"] == 8
    finally:
        proc.kill()
        proc.wait()
