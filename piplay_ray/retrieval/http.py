"""Client for a retrieval server speaking the Search-R1 protocol (ours, or Search-R1's / Dr. Zero's).

``POST {url}/retrieve`` with ``{"queries": [...], "topk": k, "return_scores": true}`` is answered by
``{"result": [[{"document": {"id", "contents", ...}, "score": s}, ...], ...]}``. One pooled session reuses
connections; connection errors, timeouts and 5xx answers are retried with exponential backoff, and after
the last retry the call raises :class:`RetrievalError` (the search env turns that into a failed tool call).
A 4xx answer is the caller's fault and is not retried.
"""

from __future__ import annotations

import threading
import time

import requests
from requests.adapters import HTTPAdapter

from piplay_ray.records import Doc
from piplay_ray.retrieval.base import RetrievalError, Retriever
from piplay_ray.retrieval.corpus import title_of
from piplay_ray.retrieval.queries import MAX_QUERIES, check_topk, clean_query


def doc_from_wire(item: dict) -> Doc:
    """One result entry: ``{"document": {...}, "score": s}``, or a bare document (``return_scores`` off)."""
    d = item.get("document", item) if isinstance(item, dict) else None
    if not isinstance(d, dict):
        raise RetrievalError(f"malformed result entry: {item!r:.200}")
    contents = d.get("contents", d.get("text"))
    if not isinstance(contents, str):
        raise RetrievalError(f"result document without `contents`: {d!r:.200}")
    return Doc(id=str(d.get("id", "")), title=str(d.get("title") or title_of(contents)), contents=contents,
               score=float(item.get("score", 0.0)))


class HttpRetriever(Retriever):
    """The server owns the index: `build_index` has nothing to build."""

    @classmethod
    def from_config(cls, cfg, show_progress: bool = False) -> HttpRetriever:
        return cls(cfg.url, cfg.timeout_s, cfg.retries, cfg.backoff_s, max_topk=cfg.max_topk,
                   max_query_chars=cfg.max_query_chars)

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 10.0, retries: int = 3,
                 backoff_s: float = 0.5, max_topk: int = 50, max_query_chars: int = 512, pool_size: int = 16):
        self.endpoint = url.rstrip("/") + "/retrieve"
        self.base_url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_topk, self.max_query_chars, self.pool_size = max_topk, max_query_chars, pool_size
        self._local = threading.local()  # requests.Session is not documented thread-safe: one per thread

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=self.pool_size))
            s.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=self.pool_size))
        return s

    def health(self) -> dict:
        r = self.session.get(self.base_url + "/health", timeout=self.timeout_s)
        r.raise_for_status()
        return r.json()

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        k = check_topk(topk, self.max_topk)
        cleaned = [clean_query(q, self.max_query_chars) for q in queries]
        live = [i for i, q in enumerate(cleaned) if q]
        out: list[list[Doc]] = [[] for _ in queries]
        if not live:
            return out
        for start in range(0, len(live), MAX_QUERIES):  # servers cap queries per request
            part = live[start : start + MAX_QUERIES]
            payload = {"queries": [cleaned[i] for i in part], "topk": k, "return_scores": True}
            result = self._post(payload)
            if not isinstance(result, list) or len(result) != len(part):
                raise RetrievalError(f"{self.endpoint}: expected {len(part)} result lists, got {result!r:.200}")
            for i, items in zip(part, result, strict=True):
                out[i] = [doc_from_wire(x) for x in items[:k]]
        return out

    def _post(self, payload: dict):
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = self.session.post(self.endpoint, json=payload, timeout=self.timeout_s)
            except requests.RequestException as e:  # refused, reset, timed out
                last = f"{type(e).__name__}: {e}"
                self._local.session = None  # drop a possibly broken pool
                continue
            if r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                raise RetrievalError(f"{self.endpoint} rejected the request: HTTP {r.status_code}: {r.text[:200]}")
            try:
                return r.json()["result"]
            except (ValueError, KeyError, TypeError):
                last = f"malformed answer: {r.text[:200]!r}"
        raise RetrievalError(f"{self.endpoint} failed after {self.retries + 1} attempts: {last}")
