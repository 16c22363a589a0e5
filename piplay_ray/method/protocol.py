"""The agent text protocol: prompts, tags and the parsing of model turns (the one module that knows the format).

The model writes `<think>…</think>`, `<search>query</search>` and `<answer>…</answer>` (the examiner writes
`<question>…</question>` before its answer); the environment inserts `<information>…</information>` after a
search. Prompts are built with the model's own chat template and encoded once; the agent loop then works on
token ids only. Parsing is total: every string maps to an :class:`Action`, malformed text to ``invalid``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from piplay_ray.records import Doc, Hop

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
QUESTION_OPEN, QUESTION_CLOSE = "<question>", "</question>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# A turn ends when the model closes an action; the closing tag is kept in the sampled tokens.
STOP_STRINGS: tuple[str, ...] = (SEARCH_CLOSE, ANSWER_CLOSE)

_TAGS = ("search", "answer", "question", "information", "think")
_ANY_TAG = re.compile(r"</?(?:" + "|".join(_TAGS) + r")>")
_MODEL_INFO = re.compile(re.escape(INFO_OPEN) + r".*?(?:" + re.escape(INFO_CLOSE) + r"|\Z)", re.S)

# Small instruct models (SmolLM2-135M) follow the format only when the instructions sit in the user turn
# with a worked example and the assistant turn opens with RESPONSE_PREFIX; large ones (Qwen3) are fine with
# the same layout. Measured in bench/protocol_adherence.py.
INSTRUCTIONS_ROLE: Literal["system", "user"] = "user"
# Fixed text that opens every prompt's assistant turn: part of the PROMPT ids (never sampled, mask 0), so
# the student, the examiner and the teacher's context all continue from it. The first turn's text then
# starts inside an open think; parsing treats a `</think>` without its opener as closing this one.
RESPONSE_PREFIX = THINK_OPEN

# The questions of the one-shot examples below; a task that copies one is refused by the integrity gate.
EXAMPLE_QUESTIONS = ("In which country is the Eiffel Tower?", "In which city is the Eiffel Tower?")

STUDENT_INSTRUCTIONS = (
    "Answer the question by searching a Wikipedia corpus. Think inside <think> and </think>. "
    "To search, write <search>your query</search>; the results are then shown to you between "
    "<information> and </information>. You may search as many times as you need. When you know the "
    "answer, write it inside <answer> and </answer>: a short answer of a few words, without explanation.\n\n"
    "Example:\n"
    f"Question: {EXAMPLE_QUESTIONS[0]}\n"
    "<think>I need to find where the Eiffel Tower is.</think><search>Eiffel Tower</search>\n"
    "<information>Doc 1 (Title: Eiffel Tower) The Eiffel Tower is a wrought-iron tower in Paris, France.\n"
    "</information>\n"
    "<think>The Eiffel Tower is in Paris, France.</think><answer>France</answer>"
)

# The closed-book baseline: the same model and answer format, no search tool (evaluation only).
CLOSED_BOOK_INSTRUCTIONS = (
    "Answer the question from what you know. Think inside <think> and </think>, then write the answer "
    "inside <answer> and </answer>: a short answer of a few words, without explanation.\n\n"
    "Example:\n"
    f"Question: {EXAMPLE_QUESTIONS[0]}\n"
    "<think>The Eiffel Tower is in Paris, France.</think><answer>France</answer>"
)

EXAMINER_INSTRUCTIONS = (
    "You write hard multi-hop questions from a Wikipedia corpus. Think inside <think> and </think>. "
    "To search, write <search>your query</search>; the results are then shown to you between "
    "<information> and </information>. When you are done, write the question inside <question> and "
    "</question>, then its answer inside <answer> and </answer>: a short answer of a few words.\n\n"
    "Example of the final output:\n"
    "<think>The document says the tower is in Paris.</think>"
    f"<question>{EXAMPLE_QUESTIONS[1]}</question><answer>Paris</answer>"
)

QCP_NOTE = (
    "Privileged information (hidden from the solver): the question was built from the source document "
    "below, then by the following searches, in order. Use it to judge good next steps."
)
PARTIAL_NOTE = (
    "Privileged information (hidden from the solver), in part: how the question was built, from the source "
    "document below and then by searches, in order, with about half of it withheld (sentences of the source "
    "left out, searches marked withheld). Use it to judge good next steps."
)
ANSWER_NOTE = "Privileged information (hidden from the solver): the answer to the question."
# Words of the source document the examiner's prompt shows (the teacher's default budget for it).
SOURCE_DOC_WORDS = 256


def _chat_ids(tokenizer, instructions: str, user: str) -> list[int]:
    """Encode the instructions and the user text with the model's chat template, then the response prefix.

    With INSTRUCTIONS_ROLE "system" the instructions are the system turn (folded into the user turn for
    templates without a system role); with "user" they open the user turn.
    """
    messages = [{"role": "user", "content": f"{instructions}\n\n{user}"}]
    if INSTRUCTIONS_ROLE == "system":
        try:
            text = tokenizer.apply_chat_template([{"role": "system", "content": instructions},
                                                  {"role": "user", "content": user}],
                                                 tokenize=False, add_generation_prompt=True)
            return list(tokenizer(text + RESPONSE_PREFIX, add_special_tokens=False)["input_ids"])
        except Exception:  # templates without a system role
            pass
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text + RESPONSE_PREFIX, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------- prompts


def student_user_text(question: str) -> str:
    return f"Question: {question.strip()}"


def student_prompt_ids(tokenizer, question: str) -> list[int]:
    """The student's prompt: the instructions and the question, ready for generation."""
    return _chat_ids(tokenizer, STUDENT_INSTRUCTIONS, student_user_text(question))


def closed_book_prompt_ids(tokenizer, question: str) -> list[int]:
    """The closed-book baseline's prompt: the question with no search tool offered."""
    return _chat_ids(tokenizer, CLOSED_BOOK_INSTRUCTIONS, student_user_text(question))


def _doc_text(doc: Doc, max_words: int | None) -> str:
    words = doc.contents.split()
    if max_words is None:
        max_words = len(words)
    body = " ".join(words[:max_words]) + (" …" if len(words) > max_words else "")
    return f"({doc.title}) {body}" if doc.title and not body.lstrip('"').startswith(doc.title) else body


def examiner_user_text(doc: Doc, hops: int, max_words: int = SOURCE_DOC_WORDS) -> str:
    if hops < 1:
        raise ValueError(f"hop target must be >= 1, got {hops}")
    if hops == 1:
        plan = ("Do not search. Write a question that can be answered from this document alone, "
                "and its answer.")
    else:
        plan = (f"Make a {hops}-hop question. Do exactly {hops - 1} search(es), each one following an entity "
                "found in the previous step outward from this document. Then write a question that needs "
                f"all {hops} steps to answer: it may name only the first entity (from this document) and "
                "must not reveal any intermediate answer. The answer is what the last step found.")
    return (f"Document:\n{_doc_text(doc, max_words)}\n\nHop target: {hops}. {plan} "
            f"End with {QUESTION_OPEN}the question{QUESTION_CLOSE}{ANSWER_OPEN}its answer{ANSWER_CLOSE}.")


def examiner_prompt_ids(tokenizer, doc: Doc, hops: int, max_words: int = SOURCE_DOC_WORDS) -> list[int]:
    """The examiner's prompt: a source document and the hop target h (h-1 searches, then question+answer)."""
    return _chat_ids(tokenizer, EXAMINER_INSTRUCTIONS, examiner_user_text(doc, hops, max_words))


def _capped(budget: int | None, cap: int | None) -> int | None:
    return cap if budget is None else budget if cap is None else min(budget, cap)


def render_qcp(source: Doc | None, qcp: Sequence[Hop | None], answer: str | None = None, budget: int | None = None,
               cap: int | None = None, source_budget: int = SOURCE_DOC_WORDS, note: str = QCP_NOTE) -> str:
    """The privileged information as text: the source document, then each search and what it found.

    `budget` words per document (None: as the examiner saw them, i.e. the source at `source_budget` words
    and each search's documents as the search env cut them); `cap` shortens every document to at most that
    many words (the even shortening that fits the teacher's context in the engine). A None search is one
    withheld (`partial_qcp`). With neither a source nor a search, only the answer is rendered (`answer` arm).
    """
    if source is None and not qcp:
        return "" if answer is None else f"{ANSWER_NOTE}\nThe answer is: {answer.strip()}"
    lines = [note]
    if source is not None:
        words = _capped(source_budget if budget is None else budget, cap)
        lines.append(f"Source document: {_doc_text(source, words)}")
    for i, hop in enumerate(qcp, 1):
        if hop is None:
            lines.append(f"Step {i}: withheld.")
            continue
        lines.append(f"Step {i}: searched {hop.query.strip()!r}.")
        if not hop.ok:
            lines.append("  (the search failed)")
        for doc in hop.docs:
            lines.append(f"  - {_doc_text(doc, _capped(budget, cap))}")
    if not qcp:
        lines.append("(The question was written from the source document without searching.)")
    if answer is not None:
        lines.append(f"The answer is: {answer.strip()}")
    return "\n".join(lines)


def teacher_prompt_ids(tokenizer, question: str, privileged: str) -> list[int]:
    """The teacher's context: the student's prompt with the privileged text (see `render_qcp`) after it.

    The student's response ids are appended to these ids unchanged, so the teacher scores exactly the
    tokens the student sampled.
    """
    user = student_user_text(question) + (f"\n\n{privileged}" if privileged else "")
    return _chat_ids(tokenizer, STUDENT_INSTRUCTIONS, user)


def information_block(text: str) -> str:
    """The environment's reply to a search, as inserted after the model's `</search>`.

    Protocol tags inside retrieved text are defused (``</information>`` becomes ``[/information]``), so a
    document can neither close the block early nor supply an answer or a question.
    """
    text = _ANY_TAG.sub(lambda m: "[" + m.group(0)[1:-1] + "]", text.strip())
    return f"\n\n{INFO_OPEN}\n{text}\n{INFO_CLOSE}\n\n"


# --------------------------------------------------------------------------------------------- parsing

ActionKind = Literal["search", "answer", "question", "invalid"]


@dataclass(frozen=True)
class Action:
    """What a model turn asks for. `question` is the examiner's final output (question + answer)."""

    kind: ActionKind
    query: str | None = None
    answer: str | None = None
    question: str | None = None
    error: str | None = None


def _clean(text: str) -> str:
    """Drop model-written `<information>` blocks (never evidence) and closed `<think>` blocks.

    Text before a first `</think>` that has no opener is a think the prompt's RESPONSE_PREFIX opened.
    """
    text = _MODEL_INFO.sub(" ", text)
    close = text.find(THINK_CLOSE)
    if close >= 0 and THINK_OPEN not in text[:close]:
        text = " " + text[close + len(THINK_CLOSE):]
    return _drop_closed_thinks(text)


def _drop_closed_thinks(text: str) -> str:
    """Replace each `<think>…</think>` (first closer after the opener) by a space; an unclosed think stays.

    A scan with `str.find` rather than a lazy regex, which retries every opener to the end of the text and
    is quadratic on many unclosed `<think>` tags (100 KB of them took ~10 s).
    """
    out, pos = [], 0
    while (i := text.find(THINK_OPEN, pos)) >= 0:
        j = text.find(THINK_CLOSE, i + len(THINK_OPEN))
        if j < 0:
            break
        out += [text[pos:i], " "]
        pos = j + len(THINK_CLOSE)
    out.append(text[pos:])
    return "".join(out)


def _unclosed(prefix: str) -> bool:
    """Whether an action tag is still open at the end of `prefix` (a tag nested inside another)."""
    return any(prefix.count(f"<{t}>") > prefix.count(f"</{t}>") for t in ("search", "answer", "question"))


def _span(text: str, open_tag: str, close_tag: str, end: int) -> tuple[str | None, str | None]:
    """The content of the tag pair that closes at `end`, or (None, error) when it is malformed."""
    start = text.rfind(open_tag, 0, end)
    if start < 0:
        return None, f"{close_tag} without {open_tag}"
    content = text[start + len(open_tag) : end]
    if _ANY_TAG.search(content) or _unclosed(text[:start]):
        return None, f"nested tags around {open_tag}"
    content = content.strip()
    if not content:
        return None, f"empty {open_tag}"
    return content, None


def _last_content(text: str, open_tag: str, close_tag: str) -> str | None:
    end = text.rfind(close_tag)
    if end < 0:
        return None
    content, _ = _span(text, open_tag, close_tag, end)
    return content


def parse_turn(text: str, role: str = "student") -> Action:
    """Map one model turn to an action; total (never raises).

    The first closed action wins (generation stops there; anything after it is ignored). A student turn
    is a search or an answer; an examiner turn is a search or a question followed by its answer.
    """
    if not isinstance(text, str):
        return Action("invalid", error="not text")
    body = _clean(text)
    s, a = body.find(SEARCH_CLOSE), body.find(ANSWER_CLOSE)
    if s < 0 and a < 0:
        if SEARCH_OPEN in body or ANSWER_OPEN in body:
            return Action("invalid", error="unclosed tag")
        return Action("invalid", error="no action")
    if s >= 0 and (a < 0 or s < a):
        query, err = _span(body, SEARCH_OPEN, SEARCH_CLOSE, s)
        return Action("search", query=query) if err is None else Action("invalid", error=err)
    answer, err = _span(body, ANSWER_OPEN, ANSWER_CLOSE, a)
    if err is not None:
        return Action("invalid", error=err)
    if role != "examiner":
        return Action("answer", answer=answer)
    q_end = body.rfind(QUESTION_CLOSE, 0, a)
    if q_end < 0:
        return Action("invalid", answer=answer, error="answer without a question")
    question, err = _span(body, QUESTION_OPEN, QUESTION_CLOSE, q_end)
    if err is not None:
        return Action("invalid", answer=answer, error=err)
    return Action("question", answer=answer, question=question)


_ACTION_OPEN = re.compile("|".join(re.escape(t) for t in (SEARCH_OPEN, ANSWER_OPEN, QUESTION_OPEN)))


def model_turns(text: str) -> list[str]:
    """A decoded response split into the model's turns (at the environment's information blocks)."""
    if not isinstance(text, str) or not text.strip():
        return []
    return [t for t in _split_after_searches(text) if t.strip()]


def _split_after_searches(text: str) -> list[str]:
    """Split at each `</search>`, optional whitespace, `<information>…</information>` (the block removed).

    Linear: once no `</information>` follows, no later block can close either (a lazy regex retried each
    `</search>` to the end of the text).
    """
    parts, pos, at = [], 0, 0
    while (s := text.find(SEARCH_CLOSE, at)) >= 0:
        k = s + len(SEARCH_CLOSE)
        while k < len(text) and text[k].isspace():
            k += 1
        if not text.startswith(INFO_OPEN, k):
            at = k
            continue
        e = text.find(INFO_CLOSE, k + len(INFO_OPEN))
        if e < 0:
            break
        parts.append(text[pos:s])
        pos = at = e + len(INFO_CLOSE)
    parts.append(text[pos:])
    return parts


def think_share(text: str) -> float:
    """Share of model turns that close a think before their first action tag (the prompt's RESPONSE_PREFIX
    opens the first turn's think); 0.0 for an empty response."""
    turns = model_turns(text)
    ok = 0
    for j, turn in enumerate(turns):
        act = _ACTION_OPEN.search(turn)
        close = turn.find(THINK_CLOSE, 0, act.start() if act else len(turn))
        opened = j == 0 and RESPONSE_PREFIX == THINK_OPEN
        ok += close >= 0 and (opened or THINK_OPEN in turn[:close])
    return ok / len(turns) if turns else 0.0


def extract_answer(text: str) -> str | None:
    """The last well-formed `<answer>` in `text` (outside model-written information), else None."""
    return _last_content(_clean(text), ANSWER_OPEN, ANSWER_CLOSE) if isinstance(text, str) else None


def extract_question(text: str) -> str | None:
    """The last well-formed `<question>` in `text`, else None."""
    return _last_content(_clean(text), QUESTION_OPEN, QUESTION_CLOSE) if isinstance(text, str) else None
