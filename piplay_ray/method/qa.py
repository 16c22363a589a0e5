"""Question-answer sets: QA files and the rule-built set (pure: no Ray, no model).

QA files follow the Search-R1 / FlashRAG conventions (JSONL or Parquet rows with ``question``, a list of
``golden_answers``, an optional ``data_source`` and an optional ``kind``: single, bridge or comparison). Two
sets come with the package, both over the embedded corpus. The natural set (`data/natural_questions.json`) is
written by hand the way people ask, and is the headline. The rule-built set is written from the corpus itself
(an article's lead sentence and short description make the question, its title is the answer); the warm
start's demonstrations use the same rule, so it checks the protocol more than it measures answering.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from piplay_ray.errors import UserInputError
from piplay_ray.method.rewards import normalize_answer
from piplay_ray.records import NATURAL_SOURCE, RULE_SOURCE

NATURAL_FILE = Path(__file__).parent / "data" / "natural_questions.json"
KINDS = ("single", "bridge", "comparison")


@dataclass
class QAExample:
    id: str
    question: str
    golden_answers: list[str]
    data_source: str
    kind: str = ""  # single, bridge or comparison where the file says; "" where it does not
    supports: tuple[str, ...] = ()  # corpus ids of the articles that answer it, where known


# ------------------------------------------------------------------------------------------ QA files


class DataError(UserInputError):
    """A QA file that cannot be read; the message names the file and the line (JSONL) or row (Parquet)."""


def _as_list(value, where: str, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise DataError(f"{where}: `{key}` must be a list of strings (or one string), "
                        f"got {type(value).__name__} {value!r:.80}")
    bad = [v for v in value if isinstance(v, dict | list | tuple)]
    if bad:
        raise DataError(f"{where}: `{key}` must hold strings, got {bad[0]!r:.80}")
    return [str(v) for v in value if v is not None and str(v).strip()]


def _golds(row: dict, where: str) -> list[str]:
    if "golden_answers" in row:
        return _as_list(row["golden_answers"], where, "golden_answers")
    gt = (row.get("reward_model") or {}).get("ground_truth") or {}  # Search-R1's processed parquet
    return _as_list(gt.get("target") if isinstance(gt, dict) else gt, where, "reward_model.ground_truth")


def _rows(path: Path) -> Iterable[tuple[str, object]]:
    """(where, row) pairs: `where` is `path:LINE` for JSONL (blank lines counted), `path: row N` for Parquet."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # not Parquet, truncated, unreadable
            raise DataError(f"{path}: cannot read Parquet: {e}") from None
        yield from ((f"{path}: row {i}", row) for i, row in enumerate(rows))
        return
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except (ValueError, RecursionError) as e:
                        raise DataError(f"{path}:{lineno}: not JSON: {e}") from None
                    yield f"{path}:{lineno}", row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _kind(row: dict) -> str:
    """`kind`, else FlashRAG's `metadata.type` (HotpotQA's bridge/comparison), when it is one of KINDS."""
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    kind = row.get("kind") or meta.get("kind") or meta.get("type") or ""
    return kind if kind in KINDS else ""


def load_qa(path: str | os.PathLike) -> list[QAExample]:
    """Read a QA file (``.jsonl``/``.json`` lines or ``.parquet``); the file stem is the default source."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"QA file not found: {path}")
    out = []
    for i, (where, row) in enumerate(_rows(path)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with `question` and `golden_answers`, "
                            f"got {type(row).__name__}")
        q, golds = row.get("question"), _golds(row, where)
        if not isinstance(q, str) or not q.strip() or not golds:
            raise DataError(f"{where}: needs a non-empty `question` and `golden_answers`")
        out.append(QAExample(id=str(row.get("id", i)), question=q.strip(), golden_answers=golds,
                             data_source=str(row.get("data_source") or path.stem), kind=_kind(row)))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


# ------------------------------------------------------------------------------------------ natural set


def natural_set(corpus_path: str | os.PathLike, size: int | None = None, seed: int = 0) -> list[QAExample]:
    """The hand-written natural questions (all, or a seeded sample of `size`), in file order.

    Empty when `corpus_path` is not the corpus they were written on (its articles differ at the
    questions' supporting ids): the questions are answerable from that corpus only.
    """
    data = json.loads(NATURAL_FILE.read_text(encoding="utf-8"))
    rows = data["questions"]
    titles = {s: t for r in rows for s, t in zip(r["supports"], r["titles"], strict=True)}
    found = {}
    try:
        with open(corpus_path, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line) if line.strip() else {}
                if isinstance(d, dict) and str(d.get("id")) in titles:
                    found[str(d["id"])] = d.get("title")
    except (ValueError, UnicodeDecodeError):  # not a JSONL corpus
        return []
    if found != titles:
        return []
    examples = [QAExample(id=r["id"], question=r["question"], golden_answers=r["golden_answers"],
                          data_source=NATURAL_SOURCE, kind=r["kind"], supports=tuple(r["supports"]))
                for r in rows]
    if size is not None and size < len(examples):
        keep = set(random.Random(seed).sample(range(len(examples)), size))
        examples = [ex for i, ex in enumerate(examples) if i in keep]
    return examples


# ------------------------------------------------------------------------------------------ rule-built set

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_COPULA = re.compile(r"\s(is|was|are|were)\s")
_STOP = {"the", "of", "and", "in", "on", "for", "to", "de", "la", "le"}


def _title_words(title: str) -> set[str]:
    return {w for w in normalize_answer(title).split() if w not in _STOP and len(w) > 1}


def rule_question(title: str, contents: str, description: str, max_words: int = 40) -> str | None:
    """A question whose answer is `title`, from the lead sentence's predicate and the short description.

    "X was a German playwright and poet." with description "German playwright (1898-1956)" becomes
    "What was a German playwright and poet? (German playwright (1898-1956))". None when the rule does not
    apply or when the question would contain a word of the title (the answer must not leak).
    """
    body = contents.split("\n", 1)[1] if contents.startswith('"') and "\n" in contents else contents
    first = _SENTENCE_END.split(body.strip(), maxsplit=1)[0].strip()
    m = _COPULA.search(first)
    if not m or not description.strip():
        return None
    predicate = first[m.end():].rstrip(" .")
    words = predicate.split()
    if len(words) < 4:
        return None
    predicate = " ".join(words[:max_words])
    question = f"What {m.group(1)} {predicate}? ({description.strip()})"
    if _title_words(title) & set(normalize_answer(question).split()) or not _title_words(title):
        return None
    return question


def golden_for_title(title: str) -> list[str]:
    """The title, and the title without a disambiguation suffix: "Protein (nutrient)" also accepts "Protein"."""
    short = re.sub(r"\s*\([^)]*\)\s*$", "", title).strip()
    return [title] if not short or short == title else [title, short]


def builtin_eval_set(corpus_path: str | os.PathLike, size: int, seed: int = 0) -> list[QAExample]:
    """`size` rule-built questions from a JSONL corpus with `title` and `description`, seeded."""
    candidates = []
    with open(corpus_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            title, desc = str(d.get("title") or ""), str(d.get("description") or "")
            q = rule_question(title, str(d.get("contents") or ""), desc) if title and desc else None
            if q:
                candidates.append(QAExample(id=f"builtin-{d.get('id')}", question=q, golden_answers=golden_for_title(title),
                                            data_source=RULE_SOURCE, supports=(str(d.get("id")),)))
    if not candidates:
        raise ValueError(f"{corpus_path}: no document has the `title` and `description` the built-in set needs")
    rng = random.Random(seed)
    return rng.sample(candidates, min(size, len(candidates)))


def held_out_articles(corpus_path: str | os.PathLike, rule_size: int, seed: int) -> set[str]:
    """Corpus ids no demonstration or rule-built task may touch: the evaluation sets' supporting articles."""
    try:
        rule = builtin_eval_set(corpus_path, rule_size, seed)
    except ValueError:  # a corpus without titles and descriptions has no rule-built set
        rule = []
    return {s for ex in [*rule, *natural_set(corpus_path)] for s in ex.supports}


def answer_article_rate(examples: Sequence[QAExample], retriever, k: int = 5) -> float:
    """Share of examples whose answer article (title equal to the first golden answer) is in the top `k`."""
    if not examples:
        return 0.0
    hits = retriever.search([ex.question for ex in examples], k)
    found = sum(any(d.title == ex.golden_answers[0] for d in docs) for ex, docs in zip(examples, hits, strict=True))
    return found / len(examples)
