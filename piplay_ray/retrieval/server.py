"""A Search-R1-compatible retrieval server over any of our retrievers (stdlib HTTP, a thread per connection).

``POST /retrieve`` ``{"queries": [...], "topk": k, "return_scores": bool}`` answers
``{"result": [[{"document": {"id", "title", "contents"}, "score": s}, ...], ...]}`` (bare documents when
``return_scores`` is false, as Search-R1 does); ``GET /health`` (and ``HEAD``) answers ``{"status": "ok", ...}``;
``OPTIONS`` names a route's methods. Bad requests get HTTP 400 with ``{"error": ...}`` (a too-large ``topk``
names the limit), a body or query list over the limits 413, a known path with the wrong method 405, a
retriever failure 500. Searches run one retriever call at a time (the retriever batches within a request;
callers that want cross-request batching go through the search env).

Abuse limits, because queries come from sampled model text and clients may be many or slow: at most
``max_queries`` per request and ``max_topk`` per query; each connection is read by a thread of its own (up
to ``max_connections``; more get 503), within ``timeout_s`` for the whole request, header and body, so a
client that trickles bytes loses its connection rather than holding a search slot; at most ``max_pending``
requests wait for the search lock (more get 503 with ``Retry-After``); queries are cleaned before the lock.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from piplay_ray.retrieval import make_retriever
from piplay_ray.retrieval.base import Retriever
from piplay_ray.retrieval.corpus import doc_to_wire
from piplay_ray.retrieval.queries import MAX_QUERIES, clean_query

MAX_BODY = 16 << 20


class RequestError(ValueError):
    """A request the client must change; ``status`` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


_ROUTES = {"/health": ("GET", "HEAD", "OPTIONS"), "/retrieve": ("POST", "OPTIONS")}
BUSY = 503


class _Handler(BaseHTTPRequestHandler):
    server: RetrievalServer
    protocol_version = "HTTP/1.1"  # keep-alive, so clients reuse connections

    def setup(self):
        self.timeout = self.server.timeout_s  # StreamRequestHandler applies it to the socket (each read)
        super().setup()

    def handle_one_request(self):
        """One request, read within `timeout_s` from its first byte to its body's last (a per-read timeout lets
        a client that sends a byte every few seconds hold the connection for ever)."""
        self._deadline = threading.Timer(self.server.timeout_s, self._expire)
        self._deadline.start()
        try:
            super().handle_one_request()
        finally:
            self._deadline.cancel()

    def _expire(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns: the thread is free

    def log_message(self, fmt, *args):  # quiet by default
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, code: int, body: dict | None, close: bool = False) -> None:
        data = b"" if body is None else json.dumps(body, ensure_ascii=False).encode()
        self.send_response(code)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code in (204, 405):
            self.send_header("Allow", ", ".join(_ROUTES[self._route()]))
        if code == BUSY:
            self.send_header("Retry-After", "1")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _wrong_method(self) -> bool:
        route = self._route()
        unread = self.command not in ("GET", "HEAD", "OPTIONS")  # a body we did not read may follow
        if route not in _ROUTES:
            self._send(404, {"error": f"no route {self.command} {self.path}"}, close=unread)
            return True
        if self.command not in _ROUTES[route]:
            self._send(405, {"error": f"{self.command} {route} is not allowed; use {_ROUTES[route][0]}"}, close=unread)
            return True
        if self.command == "OPTIONS":
            self._send(204, None)
            return True
        return False

    def do_GET(self):
        if not self._wrong_method():
            self._send(200, {"status": "ok", "retriever": type(self.server.retriever).__name__,
                             "docs": len(getattr(self.server.retriever, "corpus", ()))})

    do_HEAD = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = do_GET

    def do_POST(self):
        if self._wrong_method():
            return
        srv = self.server
        try:
            req = self._read_json()
        except RequestError as e:
            self._send(e.status, {"error": str(e)}, close=e.status == 413)
            return
        except OSError:  # truncated, stalled or cut off at the deadline: drop the connection
            self.close_connection = True
            return
        self._deadline.cancel()  # read in time: the search is not the client's to hurry
        try:
            queries, topk, scores = parse_request(req, srv.default_topk, srv.max_queries, srv.max_topk)
            queries = [clean_query(q, srv.max_query_chars) for q in queries]  # outside the search lock
            with srv.admitted(), srv.lock:
                results = srv.retriever.search(queries, topk)
        except RequestError as e:
            self._send(e.status, {"error": str(e)}, close=e.status == 413)
            return
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
    """Serve a retriever: a thread per connection (at most ``max_connections``), one search at a time, at most
    ``max_pending`` requests waiting for it."""

    def __init__(self, retriever: Retriever, host: str = "127.0.0.1", port: int = 8000, default_topk: int = 3,
                 verbose: bool = False, max_connections: int = 512, max_pending: int = 256, backlog: int = 1024,
                 timeout_s: float = 10.0, max_queries: int = MAX_QUERIES, max_topk: int | None = None):
        self.retriever, self.default_topk, self.verbose = retriever, default_topk, verbose
        self.timeout_s, self.max_queries, self.max_pending = timeout_s, max_queries, max_pending
        self.max_topk = max_topk or getattr(retriever, "max_topk", 50)
        self.max_query_chars = getattr(retriever, "max_query_chars", 512)
        self.request_queue_size = backlog  # the listen() backlog
        self.lock = threading.Lock()  # one search at a time
        self._slots = threading.BoundedSemaphore(max_connections)
        self._pending, self._count = 0, threading.Lock()
        self._served = 0
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @contextlib.contextmanager
    def admitted(self):
        """A place among the requests waiting to search, or a 503 when ``max_pending`` already wait."""
        with self._count:
            if self._pending >= self.max_pending:
                raise RequestError(f"server busy: {self._pending} requests wait to search; retry shortly", BUSY)
            self._pending += 1
        try:
            yield
        finally:
            with self._count:
                self._pending -= 1

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):  # overloaded: answer at once instead of holding the socket
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 36\r\n\r\n"
                                b'{"error": "server busy, try again"}\n')
            self.shutdown_request(request)
            return
        self._served += 1
        threading.Thread(target=self._connection, args=(request, client_address), daemon=True,
                         name=f"retrieval-connection-{self._served}").start()

    def _connection(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)

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
