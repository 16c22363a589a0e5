"""Evaluation of a student search agent: QA files, the built-in set, scoring and `piplay eval`.

QA files follow the Search-R1 / FlashRAG conventions (JSONL or Parquet rows with ``question``, a list of
``golden_answers`` and an optional ``data_source``). The built-in set is written by rule from the corpus
itself (an article's lead sentence and short description make the question, its title is the answer),
so the embedded setup can report a score with no third-party question text. Evaluation runs through the
same rollout workers and search environment as training, greedy, and scoring is a pure function of the
per-example records, so a scripted engine gives exactly known numbers.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from piplay_ray.errors import UserInputError
from piplay_ray.fault import partial
from piplay_ray.records import Trajectory
from piplay_ray.rewards import exact_match, f1, normalize_answer

BUILTIN_SOURCE = "builtin-wiki"
METRICS = ("em", "f1", "searches", "turns", "answer_words", "invalid")


@dataclass
class QAExample:
    id: str
    question: str
    golden_answers: list[str]
    data_source: str


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
                             data_source=str(row.get("data_source") or path.stem)))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


# ------------------------------------------------------------------------------------------ built-in set

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
                candidates.append(QAExample(id=f"builtin-{d.get('id')}", question=q,
                                            golden_answers=golden_for_title(title), data_source=BUILTIN_SOURCE))
    if not candidates:
        raise ValueError(f"{corpus_path}: no document has the `title` and `description` the built-in set needs")
    rng = random.Random(seed)
    return rng.sample(candidates, min(size, len(candidates)))


# ------------------------------------------------------------------------------------------ scoring


def example_record(ex: QAExample, traj: Trajectory) -> dict:
    """One evaluated example: the prediction, its scores and the agent's behaviour."""
    pred = traj.answer
    invalid = pred is None or traj.finish_reason != "answer"
    return {
        "id": ex.id, "data_source": ex.data_source, "question": ex.question, "golden_answers": ex.golden_answers,
        "prediction": pred, "em": exact_match(pred, ex.golden_answers), "f1": f1(pred, ex.golden_answers),
        "searches": traj.num_searches, "turns": traj.turns,
        "answer_words": len(pred.split()) if pred else 0, "invalid": float(invalid),
        "finish_reason": traj.finish_reason, "queries": [h.query for h in traj.hops], "text": traj.text,
    }


def summarize(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean of every metric per data source and over all examples (`overall`), with the example count.

    `answer_words` is averaged over the examples that gave an answer; the rest over all examples.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["data_source"]].append(r)
    out = {}
    for name, rows in [*sorted(groups.items()), ("overall", list(records))]:
        if not rows:
            continue
        m = {k: sum(r[k] for r in rows) / len(rows) for k in METRICS if k != "answer_words"}
        answered = [r["answer_words"] for r in rows if r["prediction"] is not None]
        m["answer_words"] = sum(answered) / len(answered) if answered else 0.0
        m["n"] = len(rows)
        out[name] = m
    return out


def flat_metrics(summary: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """`{source: {metric: v}}` as flat metrics.jsonl keys: eval/overall/em, eval/<source>/f1, ..."""
    head = f"{prefix}/" if prefix else ""
    return {f"{head}{src}/{k}": float(v) for src, m in summary.items() for k, v in m.items()}


async def evaluate(pool, examples: Sequence[QAExample],
                   temperature: float | None = 0.0) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Run every question once through a student rollout pool (greedy by default); returns (summary,
    per-example records). A question the pool lost after its retries is asked once more, then scored as
    unanswered with the reason in its record (`finish_reason` "lost: ..."): an evaluation never fails a run."""
    trajs, reason = await partial(pool.student_rollouts([ex.question for ex in examples], 1, temperature=temperature))
    lost = [i for i, group in enumerate(trajs) if group is None]
    if lost:
        again, reason = await partial(pool.student_rollouts([examples[i].question for i in lost], 1,
                                                            temperature=temperature))
        for i, group in zip(lost, again, strict=True):
            trajs[i] = group
    records = [example_record(ex, group[0]) if group is not None else lost_record(ex, reason)
               for ex, group in zip(examples, trajs, strict=True)]
    return summarize(records), records


def lost_record(ex: QAExample, reason: str | None) -> dict:
    """An example whose rollout was lost: scored as an empty trajectory (no prediction), the reason kept."""
    return example_record(ex, Trajectory(prompt_ids=[])) | {"finish_reason": f"lost: {reason}"}


async def evaluate_pool(pool, cfg, out: str | os.PathLike | None = None) -> dict[str, float]:
    """The driver's end-of-iteration evaluation on the configured set: flat scores (overall/em, ...),
    per-example outputs and metrics.json written under `out` when given."""
    examples = load_eval_examples(cfg)
    t0 = time.time()
    summary, records = await evaluate(pool, examples)
    lost = sum(r["finish_reason"].startswith("lost") for r in records)
    if out is not None:
        write_results(out, summary, records, {"examples": len(examples), "lost": lost,
                                              "seconds": round(time.time() - t0, 1)})
    return flat_metrics(summary, prefix="") | ({"overall/lost": lost} if lost else {})


def format_table(summary: dict[str, dict[str, float]]) -> str:
    cols = ("n", *METRICS)
    lines = [f"{'source':<24}" + "".join(f"{c:>13}" for c in cols)]
    for src, m in summary.items():
        lines.append(f"{src:<24}" + "".join(f"{m[c]:>13d}" if c == "n" else f"{m[c]:>13.4f}" for c in cols))
    return "\n".join(lines)


def write_results(out: str | os.PathLike, summary: dict, records: Sequence[dict], meta: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "examples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps({"summary": summary, **(meta or {})}, indent=1))
    return out


# ------------------------------------------------------------------------------------------ piplay eval


def load_eval_examples(cfg, data: Sequence[str] | None = None) -> list[QAExample]:
    """The QA files named by `data` (else `cfg.eval.data`), else the built-in set; capped by max_examples."""
    from piplay_ray import assets

    files = list(data or cfg.eval.data)
    if files:
        examples = [ex for path in files for ex in load_qa(path)]
    else:
        examples = builtin_eval_set(assets.resolve_corpus(cfg.search.corpus), cfg.eval.builtin_size, cfg.run.seed)
    return examples[: cfg.eval.max_examples] if cfg.eval.max_examples else examples


def eval_config(cfg):
    """Evaluation decodes greedily; everything else (turns, budgets, search) is the training setup."""
    cfg = cfg.model_copy(deep=True)
    cfg.rollout.temperature = 0.0
    return cfg


def run_eval(cfg, model: str, data: Sequence[str] | None = None, out: str | None = None) -> dict:
    """`piplay eval`: start the search env and a student rollout pool on `model`, score, write results."""
    import asyncio

    import ray

    from piplay_ray import assets, warmup  # warmup imports this module
    from piplay_ray.actors.rollout_pool import RolloutPool
    from piplay_ray.actors.search_env import SearchEnvPool

    cfg = eval_config(cfg)
    examples = load_eval_examples(cfg, data)
    out = out or os.path.join(cfg.run.root, f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    if name := warmup.recipe_name(model):  # a warm start of both roles: its student is what is evaluated
        model_path = str(warmup.build(name, cfg) / "student")
    else:
        model_path = assets.resolve_model(model)
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray.address if cfg.run.mode == "cluster" else None, num_cpus=cfg.ray.num_cpus,
                 namespace=cfg.ray.namespace, include_dashboard=False)
    try:
        search = SearchEnvPool(cfg.search, cfg.fault)
        pool = RolloutPool.from_config("student", model_path, cfg, search)
        t0 = time.time()
        summary, records = asyncio.run(evaluate(pool, examples))
        meta = {"model": model, "model_path": model_path, "examples": len(examples),
                "seconds": round(time.time() - t0, 1)}
    finally:
        if started:
            ray.shutdown()
    write_results(out, summary, records, meta)
    print(format_table(summary))
    print(f"per-example outputs: {Path(out) / 'examples.jsonl'}", file=sys.stderr)
    return summary


def answer_article_rate(examples: Sequence[QAExample], retriever, k: int = 5) -> float:
    """Share of examples whose answer article (title equal to the first golden answer) is in the top `k`."""
    if not examples:
        return 0.0
    hits = retriever.search([ex.question for ex in examples], k)
    found = sum(any(d.title == ex.golden_answers[0] for d in docs) for ex, docs in zip(examples, hits, strict=True))
    return found / len(examples)
