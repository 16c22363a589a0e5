"""A Search-R1-compatible retrieval server over any of our retrievers (stdlib HTTP, a bounded worker pool).

``POST /retrieve`` ``{"queries": [...], "topk": k, "return_scores": bool}`` answers
``{"result": [[{"document": {"id", "title", "contents"}, "score": s}, ...], ...]}`` (bare documents when
``return_scores`` is false, as Search-R1 does); ``GET /health`` answers ``{"status": "ok", ...}``. Bad
requests get HTTP 400 with ``{"error": ...}`` (a too-large ``topk`` names the limit), a body or query list
over the limits 413, a known path with the wrong method 405, a retriever failure 500. Requests are served
one retriever call at a time (the retriever batches within a request; callers that want cross-request
batching go through the search env).

Abuse limits, because queries come from sampled model text and clients may be many: at most
``max_queries`` per request and ``max_topk`` per query, a listen backlog of ``backlog`` (connections beyond
it wait in the kernel rather than being reset), ``workers`` threads (connections beyond them wait in a
bounded queue; a full queue gets 503), and a socket timeout so a truncated body cannot pin a worker.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from piplay_ray.retrieval import make_retriever
from piplay_ray.retrieval.base import Retriever
from piplay_ray.retrieval.corpus import doc_to_wire
from piplay_ray.retrieval.queries import MAX_QUERIES

MAX_BODY = 16 << 20


class RequestError(ValueError):
    """A request the client must change; ``status`` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


_ROUTES = {"/health": "GET", "/retrieve": "POST"}


class _Handler(BaseHTTPRequestHandler):
    server: RetrievalServer
    protocol_version = "HTTP/1.1"  # keep-alive, so clients reuse connections

    def setup(self):
        self.timeout = self.server.timeout_s  # StreamRequestHandler applies it to the socket
        super().setup()

    def log_message(self, fmt, *args):  # quiet by default
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, code: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        # Let a waiting connection have this worker rather than keeping an idle keep-alive one.
        close = close or self.server.has_waiting()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code == 405:
            self.send_header("Allow", _ROUTES[self._route()])
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _wrong_method(self) -> bool:
        route = self._route()
        if route not in _ROUTES:
            self._send(404, {"error": f"no route {self.command} {self.path}"}, close=self.command != "GET")
            return True
        if _ROUTES[route] != self.command:
            self._send(405, {"error": f"{self.command} {route} is not allowed; use {_ROUTES[route]}"},
                       close=self.command != "GET")  # a body we did not read may follow
            return True
        return False

    def do_GET(self):
        if not self._wrong_method():
            self._send(200, {"status": "ok", "retriever": type(self.server.retriever).__name__,
                             "docs": len(getattr(self.server.retriever, "corpus", ()))})

    do_PUT = do_DELETE = do_PATCH = do_GET

    def do_POST(self):
        if self._wrong_method():
            return
        try:
            req = self._read_json()
            queries, topk, scores = parse_request(req, self.server.default_topk, self.server.max_queries,
                                                  self.server.max_topk)
        except RequestError as e:
            self._send(e.status, {"error": str(e)}, close=e.status == 413)
            return
        except (TimeoutError, ConnectionError):  # truncated or stalled body: drop the connection
            self.close_connection = True
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

    def _read_json(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError("Content-Length must be an integer") from None
        if length > MAX_BODY:
            raise RequestError(f"the body is {length} bytes; the limit is {MAX_BODY}", 413)
        if length <= 0:
            raise RequestError("the body is empty; send a JSON object")
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionError("body truncated")
        try:
            return json.loads(body)
        except RecursionError:
            raise RequestError("the body is nested too deeply") from None
        except ValueError as e:
            raise RequestError(f"the body is not JSON: {e}") from None


def parse_request(req, default_topk: int, max_queries: int = MAX_QUERIES,
                  max_topk: int = 50) -> tuple[list[str], int, bool]:
    """Validate a /retrieve body; raises :class:`RequestError` with a message meant for the client."""
    if not isinstance(req, dict):
        raise RequestError("the body must be a JSON object")
    queries = req.get("queries")
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise RequestError("`queries` must be a list of strings")
    if len(queries) > max_queries:
        raise RequestError(f"{len(queries)} queries in one request; the limit is {max_queries}", 413)
    topk = req.get("topk")
    topk = default_topk if topk is None else topk  # null or absent: the server's default
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise RequestError(f"`topk` must be an integer >= 1, got {topk!r}")
    if topk > max_topk:
        raise RequestError(f"`topk` is {topk}; the limit is {max_topk}")
    return queries, topk, bool(req.get("return_scores", False))


class RetrievalServer(HTTPServer):
    """Serve a retriever; ``workers`` threads handle connections taken from a queue of ``backlog`` slots."""

    def __init__(self, retriever: Retriever, host: str = "127.0.0.1", port: int = 8000, default_topk: int = 3,
                 verbose: bool = False, workers: int = 16, backlog: int = 1024, timeout_s: float = 10.0,
                 max_queries: int = MAX_QUERIES, max_topk: int | None = None):
        self.retriever, self.default_topk, self.verbose = retriever, default_topk, verbose
        self.timeout_s, self.max_queries = timeout_s, max_queries
        self.max_topk = max_topk or getattr(retriever, "max_topk", 50)
        self.request_queue_size = backlog  # the listen() backlog
        self.lock = threading.Lock()
        self._waiting: queue.Queue = queue.Queue(maxsize=backlog)
        super().__init__((host, port), _Handler)
        self._workers = [threading.Thread(target=self._work, name=f"retrieval-worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._workers:
            t.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def has_waiting(self) -> bool:
        return not self._waiting.empty()

    def process_request(self, request, client_address):
        try:
            self._waiting.put_nowait((request, client_address))
        except queue.Full:  # overloaded: answer at once instead of holding the socket
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: 36\r\n\r\n"
                                b'{"error": "server busy, try again"}\n')
            except OSError:
                pass
            self.shutdown_request(request)

    def _work(self) -> None:
        while (item := self._waiting.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        while True:  # close connections nobody will serve, then stop the workers
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for _ in self._workers:
            self._waiting.put(None)

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
    server = RetrievalServer(retriever, host, port, default_topk=cfg.topk, verbose=True,
                             timeout_s=cfg.timeout_s, max_topk=cfg.max_topk)
    print(f"[piplay retriever] serving {cfg.retriever} on {server.url} (POST /retrieve, GET /health)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
