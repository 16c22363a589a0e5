"""A Search-R1-compatible retrieval server over any of our retrievers (stdlib HTTP, one thread per connection).

``POST /retrieve`` ``{"queries": [...], "topk": k, "return_scores": bool}`` answers
``{"result": [[{"document": {"id", "title", "contents"}, "score": s}, ...], ...]}`` (bare documents when
``return_scores`` is false, as Search-R1 does); ``GET /health`` answers ``{"status": "ok", ...}``. Bad
requests get HTTP 400 with ``{"error": ...}``; a retriever failure gets HTTP 500. Requests are served one
retriever call at a time (the retriever batches within a request; callers that want cross-request batching
go through the search env).
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from piplay_ray.retrieval import make_retriever
from piplay_ray.retrieval.base import Retriever
from piplay_ray.retrieval.corpus import doc_to_wire

MAX_BODY = 16 << 20


class _Handler(BaseHTTPRequestHandler):
    server: RetrievalServer
    protocol_version = "HTTP/1.1"  # keep-alive, so clients reuse connections

    def log_message(self, fmt, *args):  # quiet by default
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "retriever": type(self.server.retriever).__name__,
                             "docs": len(getattr(self.server.retriever, "corpus", ()))})
        else:
            self._send(404, {"error": f"no route GET {self.path}"})

    def do_POST(self):
        if self.path.rstrip("/") != "/retrieve":
            self._send(404, {"error": f"no route POST {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                raise ValueError(f"body must be 1..{MAX_BODY} bytes, got {length}")
            req = json.loads(self.rfile.read(length))
            queries, topk, scores = parse_request(req, self.server.default_topk)
        except ValueError as e:
            self._send(400, {"error": str(e)})
            return
        try:
            with self.server.lock:
                results = self.server.retriever.search(queries, topk)
        except ValueError as e:
            self._send(400, {"error": str(e)})
            return
        except Exception as e:  # the retriever broke: tell the client, keep serving
            self._send(500, {"error": f"{type(e).__name__}: {e}"})
            return
        if scores:
            out = [[{"document": doc_to_wire(d), "score": d.score} for d in docs] for docs in results]
        else:
            out = [[doc_to_wire(d) for d in docs] for docs in results]
        self._send(200, {"result": out})


def parse_request(req, default_topk: int) -> tuple[list[str], int, bool]:
    """Validate a /retrieve body; raises ValueError with a message meant for the client."""
    if not isinstance(req, dict):
        raise ValueError("the body must be a JSON object")
    queries = req.get("queries")
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError("`queries` must be a list of strings")
    topk = req.get("topk")
    topk = default_topk if topk is None else topk  # null or absent: the server's default
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"`topk` must be an integer >= 1, got {topk!r}")
    return queries, topk, bool(req.get("return_scores", False))


class RetrievalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, retriever: Retriever, host: str = "127.0.0.1", port: int = 8000, default_topk: int = 3,
                 verbose: bool = False):
        self.retriever, self.default_topk, self.verbose = retriever, default_topk, verbose
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        """Serve from a daemon thread (tests, embedding); stop with ``shutdown()`` then ``server_close()``."""
        t = threading.Thread(target=self.serve_forever, name="retrieval-server", daemon=True)
        t.start()
        return t


def serve(cfg, host: str = "127.0.0.1", port: int = 8000) -> None:
    """`piplay retriever serve`: build or load the configured retriever and serve it until interrupted."""

    if cfg.retriever == "http":
        raise ValueError("search.retriever=http would proxy to another server; serve bm25 or dense instead")
    retriever = make_retriever(cfg, show_progress=True)
    server = RetrievalServer(retriever, host, port, default_topk=cfg.topk, verbose=True)
    print(f"[piplay retriever] serving {cfg.retriever} on {server.url} (POST /retrieve, GET /health)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
