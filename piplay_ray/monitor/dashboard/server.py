"""The evolution dashboard's HTTP server: a read-only JSON view of one run directory plus the static page.

Stdlib only (`http.server`), so it runs inside the driver as a thread (`start_dashboard`) or on its own
for a finished run (`serve_run`, i.e. `piplay dashboard RUN_DIR`). Safety: loopback by default; GET/HEAD
only; every file it reads is resolved inside the run directory (`..`, absolute paths and symlinks that
leave it are refused); on a loopback bind the Host header must name loopback (no DNS rebinding); the page
is served with a strict Content-Security-Policy, and the page itself renders model text as text only.

Endpoints: `/api/run`, `/api/metrics?offset=BYTES` (incremental: the page polls and appends),
`/api/summary` (the run summary of `piplay_ray.monitor.summary`, recomputed per request), `/api/health`,
`/api/tasks`, `/api/task?id=ID`, `/api/file?path=REL` (text files, e.g. logs/).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from piplay_ray.monitor import summary as run_summary

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
                 ".txt": "text/plain; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
METRICS_CHUNK = 4 << 20  # bytes of metrics.jsonl per response; the page asks again while `more`
FILE_TAIL = 256 << 10  # /api/file returns at most the last 256 KiB
SAMPLE_RE = re.compile(r"^(examiner|student)-step-(\d+)\.jsonl$")
TASKS_RE = re.compile(r"^iter-(\d+)\.jsonl$")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
# trajectory fields the browser never needs (token ids and sampling logprobs)
HEAVY_FIELDS = ("prompt_ids", "response_ids", "mask", "logprobs")


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def safe_relpath(rel: str) -> str:
    """Check a client-supplied path relative to the run directory: no absolute paths, no `..`."""
    if not rel or "\x00" in rel or "\\" in rel:
        raise RequestError(HTTPStatus.BAD_REQUEST, "bad path")
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel) or os.path.isabs(rel):
        raise RequestError(HTTPStatus.BAD_REQUEST, "absolute paths are refused")
    if any(part == ".." for part in rel.split("/")):
        raise RequestError(HTTPStatus.BAD_REQUEST, "'..' is refused")
    return rel


def within(root: Path, path: Path) -> bool:
    """Whether `path` resolves (symlinks followed) to `root` or below it; `root` is already resolved."""
    path = path.resolve()
    return path == root or root in path.parents


def resolve_in(root: Path, rel: str) -> Path:
    """`root/rel`, refused unless it resolves (symlinks included) inside root."""
    path = (root / safe_relpath(rel)).resolve()
    if path != root and root not in path.parents:
        raise RequestError(HTTPStatus.FORBIDDEN, "outside the run directory")
    return path


def _finite(obj: Any) -> Any:
    """Replace NaN/inf with None so the response is strict JSON (browsers reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _parse_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a damaged line must not hide the rest of the run
        if isinstance(obj, dict):
            rows.append(_finite(obj))
    return rows


class RunReader:
    """Reads a run directory, caching parsed JSONL files by (mtime, size) so polling stays cheap."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir}")
        self._cache: dict[Path, tuple[tuple[int, int], list[dict]]] = {}
        self._lock = threading.Lock()

    def _inside(self, path: Path) -> bool:
        """Whether `path` resolves (symlinks followed) inside the run directory; a file or folder symlinked
        out of the run is treated as absent, so no endpoint serves what lies outside."""
        return within(self.root, path)

    def _jsonl(self, path: Path) -> list[dict]:
        if not self._inside(path):
            return []
        try:
            st = path.stat()
        except FileNotFoundError:
            return []
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(path)
            if hit and hit[0] == key:
                return hit[1]
        rows = _parse_lines(path.read_text(encoding="utf-8", errors="replace"))
        with self._lock:
            self._cache[path] = (key, rows)
        return rows

    def _files(self, sub: str, pattern: re.Pattern) -> list[tuple[int, str, Path]]:
        d = self.root / sub
        if not d.is_dir() or not self._inside(d):
            return []
        out = []
        for p in d.iterdir():
            m = pattern.match(p.name)
            if m and p.is_file() and self._inside(p) and p.resolve().parent == d.resolve():
                out.append((int(m.groups()[-1]), m.group(1) if m.lastindex == 2 else "", p))
        return sorted(out)

    # ------------------------------------------------------------------------------------ endpoints

    def run_info(self) -> dict:
        cfg = self.root / "config.yaml"
        ok = cfg.is_file() and self._inside(cfg)
        text = cfg.read_text(encoding="utf-8", errors="replace")[:65536] if ok else None
        return {"name": self.root.name, "config": text}

    def metrics(self, offset: int) -> dict:
        """Complete lines of metrics.jsonl from byte `offset`; `next` is where to continue."""
        path = self.root / "metrics.jsonl"
        if not path.is_file() or not self._inside(path):
            return {"rows": [], "next": 0, "reset": offset != 0, "more": False}
        size = path.stat().st_size
        with open(path, "rb") as f:
            if 0 < offset <= size:
                f.seek(offset - 1)  # a line ends there, unless the run rewound the file (a re-done step)
            # start over if the file was replaced or cut back (a resume or rollback rewinds it)
            reset = offset > size or (offset > 0 and f.read(1) != b"\n")
            if reset or offset < 0:
                offset = 0
            f.seek(offset)
            chunk = f.read(METRICS_CHUNK)
        end = chunk.rfind(b"\n") + 1  # an unfinished last line waits for the next poll
        rows = _parse_lines(chunk[:end].decode("utf-8", errors="replace"))
        nxt = offset + end
        return {"rows": rows, "next": nxt, "reset": reset, "more": nxt < size and end > 0}

    def health(self) -> dict:
        path = self.root / "health.json"
        if not self._inside(path):
            return {"actors": {}, "updated": None}
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {"actors": {}, "updated": None}
        return _finite(body) if isinstance(body, dict) else {"actors": {}, "updated": None}

    def summary(self) -> dict:
        """The run summary so far (a read of metrics.jsonl and eval/*/metrics.json: cheap enough per poll)."""
        return _finite(run_summary.compute(self.root))

    def _samples(self) -> list[dict]:
        out = []
        for step, role, path in self._files("samples", SAMPLE_RE):
            for i, rec in enumerate(self._jsonl(path)):
                out.append({"role": role, "step": step, "index": i, "file": path.name, **rec})
        return out

    def _tasks(self) -> dict[str, dict]:
        tasks: dict[str, dict] = {}
        for it, _, path in self._files("tasks", TASKS_RE):
            for t in self._jsonl(path):
                if isinstance(t.get("id"), str):
                    t.setdefault("iteration", it)
                    tasks[t["id"]] = t
        return tasks

    def tasks(self) -> dict:
        """Every task (from tasks/ and from samples), with the number and mean reward of its samples."""
        tasks = self._tasks()
        stats: dict[str, list[float]] = {}
        for s in self._samples():
            t = s.get("task")
            if not isinstance(t, dict) or not isinstance(t.get("id"), str):
                continue
            tasks.setdefault(t["id"], t)
            if s["role"] == "student" and isinstance(s.get("reward"), int | float):
                stats.setdefault(t["id"], []).append(float(s["reward"]))
        out = []
        for tid, t in tasks.items():
            rewards = stats.get(tid, [])
            out.append({"id": tid, "iteration": t.get("iteration", 0), "question": t.get("question", ""),
                        "answer": t.get("answer", ""), "hops": t.get("hops"), "valid": _valid(t),
                        "samples": len(rewards), "mean_reward": sum(rewards) / len(rewards) if rewards else None})
        out.sort(key=lambda t: (-int(t["iteration"] or 0), -t["samples"], t["id"]))
        return {"tasks": out, "iterations": sorted({t["iteration"] for t in out})}

    def task(self, task_id: str) -> dict:
        """One task with its QCP and every sampled trajectory for it (student and examiner)."""
        task = self._tasks().get(task_id)
        samples = []
        for s in self._samples():
            t = s.get("task")
            if not isinstance(t, dict) or t.get("id") != task_id:
                continue
            task = task or t
            traj = {k: v for k, v in (s.get("trajectory") or {}).items() if k not in HEAVY_FIELDS}
            samples.append({"role": s["role"], "step": s["step"], "file": s["file"], "reward": s.get("reward"),
                            "tokens": s.get("tokens"), "token_kl": s.get("token_kl"), "trajectory": traj})
        if task is None:
            raise RequestError(HTTPStatus.NOT_FOUND, "no such task")
        task = dict(task)
        if isinstance(task.get("trajectory"), dict):
            task["trajectory"] = {k: v for k, v in task["trajectory"].items() if k not in HEAVY_FIELDS}
        return {"task": task, "samples": samples}

    def file(self, rel: str) -> dict:
        path = resolve_in(self.root, rel)
        if not path.is_file():
            raise RequestError(HTTPStatus.NOT_FOUND, "no such file")
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - FILE_TAIL))
            text = f.read().decode("utf-8", errors="replace")
        return {"path": rel, "size": size, "truncated": size > FILE_TAIL, "text": text}


def _valid(task: dict) -> bool | None:
    flags = task.get("flags")
    return bool(flags) and all(flags.values()) if isinstance(flags, dict) else None


class DashboardHandler(BaseHTTPRequestHandler):
    server_version = "piplay-dashboard"
    reader: RunReader  # set on the subclass made per server
    loopback_only: bool = True

    def log_message(self, fmt: str, *args) -> None:  # keep the driver's console quiet
        log.debug("dashboard: " + fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json({"error": message}, status=int(status))

    def do_GET(self) -> None:
        try:
            self._check_host()
            url = urlsplit(self.path)
            path = unquote(url.path)
            if "\x00" in path or "\\" in path or any(p == ".." for p in path.split("/")):
                raise RequestError(HTTPStatus.BAD_REQUEST, "'..' is refused")
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            self._route(path, query)
        except RequestError as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug must not kill the server thread of a training run
            log.exception("dashboard request %s failed", self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, type(e).__name__)

    do_HEAD = do_GET

    def _refuse_write(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "the dashboard is read-only")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_write

    def _check_host(self) -> None:
        if not self.loopback_only:
            return
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in LOOPBACK:
            raise RequestError(HTTPStatus.FORBIDDEN, "unexpected Host header")

    def _route(self, path: str, q: dict[str, str]) -> None:
        r = self.reader
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path == "/api/run":
            return self._json(r.run_info())
        if path == "/api/metrics":
            try:
                offset = int(q.get("offset", "0"))
            except ValueError:
                raise RequestError(HTTPStatus.BAD_REQUEST, "offset must be an integer") from None
            return self._json(r.metrics(offset))
        if path == "/api/health":
            return self._json(r.health())
        if path == "/api/summary":
            return self._json(r.summary())
        if path == "/api/tasks":
            return self._json(r.tasks())
        if path == "/api/task":
            if not q.get("id"):
                raise RequestError(HTTPStatus.BAD_REQUEST, "id is required")
            return self._json(r.task(q["id"]))
        if path == "/api/file":
            return self._json(r.file(q.get("path", "")))
        raise RequestError(HTTPStatus.NOT_FOUND, "not found")

    def _static(self, name: str) -> None:
        if "/" in name or name.startswith(".") or name not in _static_names():
            raise RequestError(HTTPStatus.NOT_FOUND, "not found")
        path = STATIC_DIR / name
        ctype = CONTENT_TYPES.get(path.suffix, "text/plain; charset=utf-8")
        self._send(200, path.read_bytes(), ctype)


def _static_names() -> frozenset[str]:
    return frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())


def make_server(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8390) -> ThreadingHTTPServer:
    """A dashboard server for `run_dir` bound to host:port (port 0 picks a free one); not yet serving."""
    reader = RunReader(run_dir)
    handler = type("Handler", (DashboardHandler,), {"reader": reader, "loopback_only": host in LOOPBACK})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def _url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"


def start_dashboard(run_dir: str | os.PathLike, host: str = "127.0.0.1",
                    port: int = 8390) -> tuple[str, Callable[[], None]]:
    """Serve the dashboard from a background thread (the driver's); returns (url, stop).

    A port already in use falls back to a free one (a busy port must not stop a training run)."""
    try:
        server = make_server(run_dir, host, port)
    except OSError as e:
        if e.errno != errno.EADDRINUSE or port == 0:
            raise
        log.warning("dashboard port %d is in use; serving on a free port instead", port)
        server = make_server(run_dir, host, 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="piplay-dashboard", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return _url(server), stop


def serve_run(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8390) -> None:
    """Serve a run directory's dashboard in the foreground until interrupted (`piplay dashboard RUN_DIR`)."""
    try:
        server = make_server(run_dir, host, port)
    except OSError as e:  # a missing run directory, a port in use: one line, not a traceback
        raise SystemExit(f"piplay dashboard: {e}") from None
    print(f"piplay dashboard for {Path(run_dir).resolve()} at {_url(server)}", flush=True)
    if host not in LOOPBACK:
        print("warning: the dashboard is reachable from other machines (it is read-only)", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
