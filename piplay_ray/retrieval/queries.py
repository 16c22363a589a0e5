"""What a search query and a `topk` may be, and what happens to ones that are not (pure functions).

Queries come from sampled model text, so anything can arrive. The rules, applied by every retriever:

- control and format characters (``\\x00``, ``\\x1b``, zero-width, ...) become spaces;
- invalid Unicode (lone surrogates, undecodable bytes) is dropped;
- whitespace runs collapse to one space, ends are stripped;
- a query longer than ``max_chars`` is cut at the last word boundary before the limit;
- a query that is empty after this returns no documents (the search env reports it as a failed call);
- ``topk < 1`` (or not an integer) is an error (:class:`ValueError`); ``topk > max_topk`` is clamped.
"""

from __future__ import annotations

import operator
import re
import unicodedata

_SPACES = re.compile(r"\s+")
MAX_QUERIES = 1024  # per HTTP request: our server refuses more, our client splits larger batches


def clean_query(query: str | bytes, max_chars: int = 512) -> str:
    if isinstance(query, bytes):
        query = query.decode("utf-8", errors="ignore")
    elif not isinstance(query, str):
        raise TypeError(f"a query must be a string, got {type(query).__name__}")
    query = query.encode("utf-8", errors="ignore").decode("utf-8")  # drops lone surrogates
    if not query.isprintable():
        query = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in query)
    query = _SPACES.sub(" ", query).strip()
    if len(query) > max_chars:
        cut = query[: max_chars + 1].rsplit(" ", 1)[0] if " " in query[: max_chars + 1] else ""
        query = (cut or query[:max_chars]).rstrip()
    return query


def check_topk(topk: int, max_topk: int) -> int:
    try:
        if isinstance(topk, bool):
            raise TypeError
        topk = operator.index(topk)  # int or numpy integer; not float, str or None
    except TypeError:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}") from None
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    return min(topk, max_topk)
