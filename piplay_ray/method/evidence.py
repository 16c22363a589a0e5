"""How retrieved documents read to the agent: each cut to a word budget and numbered with its title.

Pure, so the search env actor, the warm start's demonstrations and a learner rank on a machine without Ray
all import it.
"""

from __future__ import annotations

from piplay_ray.records import Doc


def body_of(doc: Doc) -> str:
    """The document text without a leading title line (wiki JSONL repeats the title there)."""
    head, _, rest = doc.contents.partition("\n")
    return rest.strip() if rest and head.strip().strip('"') == doc.title else doc.contents.strip()


def truncate_words(text: str, budget: int) -> str:
    words = text.split()
    return text if len(words) <= budget else " ".join(words[:budget]) + " ..."


def _line_head(i: int, doc: Doc) -> str:
    return f"Doc {i} (Title: {doc.title}) "


def format_docs(docs: list[Doc], budget: int) -> tuple[list[Doc], str]:
    """Cut each document to `budget` words and number them: ``Doc 1 (Title: T) text``, one per line."""
    cut = [Doc(d.id, d.title, truncate_words(body_of(d), budget), d.score) for d in docs]
    if not cut:
        return cut, "No results found."
    return cut, "\n".join(_line_head(i, d) + d.contents for i, d in enumerate(cut, 1))


def shown_docs(docs: list[Doc], shown: int) -> list[Doc]:
    """`docs` (as `format_docs` cut them) as far as the first `shown` characters of their text reach, e.g. after
    the text was cut to a token limit: the evidence exactly as the agent saw it, for the QCP and the gate."""
    out, start = [], 0
    for i, d in enumerate(docs, 1):
        room = shown - start - len(_line_head(i, d))
        if room <= 0:
            break
        out.append(Doc(d.id, d.title, d.contents[:room], d.score))
        start += len(_line_head(i, d)) + len(d.contents) + 1
    return out
