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


def format_docs(docs: list[Doc], budget: int) -> tuple[list[Doc], str]:
    """Cut each document to `budget` words and number them: ``Doc 1 (Title: T) text``, one per line."""
    cut = [Doc(d.id, d.title, truncate_words(body_of(d), budget), d.score) for d in docs]
    if not cut:
        return cut, "No results found."
    return cut, "\n".join(f"Doc {i} (Title: {d.title}) {d.contents}" for i, d in enumerate(cut, 1))
