"""Protocol adherence: how often a model follows the agent text protocol, per prompt variant.

One vLLM engine in this process, the real BM25 search service and the rollout settings of a config
(default configs/local.yaml). For each variant: the built-in eval questions as student at temperature 1.0
and greedy (fraction with a parsed `<answer>`, fraction that searched at least once, exact match), and
examiner prompts drawn by :class:`ExaminerSampler` at the config temperature (fraction with a parsed
question and answer, integrity-gate pass rate). Variants patch :mod:`piplay_ray.method.protocol` in place;
`current` is the module as shipped, `baseline` the prompts before this benchmark existed. The last line
printed is one JSON object.

    python bench/protocol_adherence.py                                  # SmolLM2, every variant
    python bench/protocol_adherence.py --variants baseline,current --questions 8 --examiner 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from contextlib import contextmanager

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rollout import LocalSearch  # noqa: E402  (bench/rollout.py, beside this script)

# The prompts as they were before this benchmark: instructions as the system turn, no example, no prefix.
LEGACY_STUDENT = (
    "You answer questions by searching a Wikipedia corpus. Reason inside <think> and </think>. "
    "To search, write <search>your query</search>; the results are then shown to you between "
    "<information> and </information>. You may search as many times as you need. When you know the "
    "answer, write it inside <answer> and </answer>: a short answer of a few words, without explanation. "
    "For example, <answer>Paris</answer>."
)
LEGACY_EXAMINER = (
    "You write hard multi-hop questions from a Wikipedia corpus. Reason inside <think> and </think>. "
    "To search, write <search>your query</search>; the results are then shown to you between "
    "<information> and </information>. When you are done, write the question inside <question> and "
    "</question>, then its answer inside <answer> and </answer>: a short answer of a few words."
)


def _legacy_examiner_user_text(original):
    def text(doc, hops, max_words=256):
        return original(doc, hops, max_words).rsplit(" End with ", 1)[0]
    return text


# A worked example given as a previous chat exchange instead of inside the instructions.
FEWSHOT = {
    "student": ("Question: In which country is the Eiffel Tower?",
                "<think>I need to find where the Eiffel Tower is.</think><search>Eiffel Tower</search>\n"
                "<information>Doc 1 (Title: Eiffel Tower) The Eiffel Tower is a wrought-iron tower in Paris, "
                "France.</information>\n<think>It is in Paris, France.</think><answer>France</answer>"),
    "examiner": ("Document:\n(Eiffel Tower) The Eiffel Tower is a wrought-iron tower in Paris, France.\n\n"
                 "Hop target: 1. Do not search. Write a question that can be answered from this document "
                 "alone, and its answer.",
                 "<think>The document says the tower is in Paris.</think>"
                 "<question>In which city is the Eiffel Tower?</question><answer>Paris</answer>"),
}


def _fewshot_chat_ids(protocol):
    def chat_ids(tokenizer, instructions, user):
        head = instructions.split("\n\nExample", 1)[0]
        ex_user, ex_assistant = FEWSHOT["examiner" if instructions.startswith("You write") else "student"]
        messages = [{"role": "user", "content": f"{head}\n\n{ex_user}"},
                    {"role": "assistant", "content": ex_assistant},
                    {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text + protocol.RESPONSE_PREFIX, add_special_tokens=False)["input_ids"])
    return chat_ids


def variants(protocol) -> dict[str, dict]:
    """name -> protocol attributes to patch (empty: the module as shipped)."""
    legacy_texts = {"STUDENT_INSTRUCTIONS": LEGACY_STUDENT, "EXAMINER_INSTRUCTIONS": LEGACY_EXAMINER,
                    "examiner_user_text": _legacy_examiner_user_text(protocol.examiner_user_text)}
    return {
        "baseline": {"INSTRUCTIONS_ROLE": "system", "RESPONSE_PREFIX": "", **legacy_texts},
        "legacy_user": {"INSTRUCTIONS_ROLE": "user", "RESPONSE_PREFIX": "", **legacy_texts},
        "legacy_user_think": {"INSTRUCTIONS_ROLE": "user", "RESPONSE_PREFIX": protocol.THINK_OPEN, **legacy_texts},
        "oneshot_system": {"INSTRUCTIONS_ROLE": "system", "RESPONSE_PREFIX": ""},
        "oneshot_user": {"INSTRUCTIONS_ROLE": "user", "RESPONSE_PREFIX": ""},
        "oneshot_system_think": {"INSTRUCTIONS_ROLE": "system", "RESPONSE_PREFIX": protocol.THINK_OPEN},
        "oneshot_user_think": {"INSTRUCTIONS_ROLE": "user", "RESPONSE_PREFIX": protocol.THINK_OPEN},
        "fewshot_chat_think": {"_chat_ids": _fewshot_chat_ids(protocol), "RESPONSE_PREFIX": protocol.THINK_OPEN},
        "current": {},
    }


@contextmanager
def patched(module, attrs: dict):
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _frac(xs) -> float:
    xs = list(xs)
    return round(sum(map(float, xs)) / len(xs), 3) if xs else 0.0


async def run_variant(engine, search, tok, cfg, examples, ex_docs, ex_hops, temps, ex_temps, top_p):
    from dataclasses import replace

    from piplay_ray.engines.base import SamplingSpec
    from piplay_ray.evolution.evaluation import example_record
    from piplay_ray.method import protocol
    from piplay_ray.method.agent import run_agent
    from piplay_ray.method.examiner import build_task

    r = cfg.rollout
    # no per-request seeds: vllm-cpu 0.32 dies on seeded requests in a mixed batch ("CPU Generator does
    # not use offset"), so temperature-1.0 figures carry sampling noise
    spec = SamplingSpec(max_tokens=r.turn_tokens, temperature=r.temperature, top_p=top_p)

    def agent(prompt, role, temperature):
        s = replace(spec, temperature=temperature)
        return run_agent(engine, search, tok, prompt, s, cfg.student.max_turns if role == "student"
                         else cfg.examiner.max_turns, role=role, max_response_tokens=r.max_response_tokens,
                         max_context=r.max_model_len)

    jobs, labels = [], []
    for t in temps:
        for ex in examples:
            jobs.append(agent(protocol.student_prompt_ids(tok, ex.question), "student", t))
            labels.append(("student", t, ex))
    for t in ex_temps:
        for d, h in zip(ex_docs, ex_hops, strict=True):
            jobs.append(agent(protocol.examiner_prompt_ids(tok, d, h), "examiner", t))
            labels.append(("examiner", t, (d, h)))
    t0 = time.perf_counter()
    trajs = await asyncio.gather(*jobs)
    wall = time.perf_counter() - t0

    out: dict = {"wall_s": round(wall, 1), "generated_tokens": sum(sum(t.mask) for t in trajs)}
    for t in temps:
        recs = [example_record(ex, tr) for (role, tt, ex), tr in zip(labels, trajs, strict=True)
                if role == "student" and tt == t]
        out[f"student_t{t:g}"] = {"answered": _frac(r_["prediction"] is not None for r_ in recs),
                                  "searched": _frac(r_["searches"] > 0 for r_ in recs),
                                  "em": _frac(r_["em"] for r_ in recs),
                                  "invalid": _frac(r_["invalid"] for r_ in recs)}
    for t in ex_temps:
        tasks = [build_task(tr, *item, cfg.examiner) for (role, tt, item), tr in zip(labels, trajs, strict=True)
                 if role == "examiner" and tt == t]
        out[f"examiner_t{t:g}"] = {"parsed": _frac(k.trajectory.finish_reason == "question" for k in tasks),
                                   "gate": _frac(k.valid for k in tasks),
                                   "searched": _frac(len(k.qcp) > 0 for k in tasks)}
    samples = {"student": [tr.text[:300] for (role, tt, _), tr in zip(labels, trajs, strict=True)
                           if role == "student" and tt == temps[0]][:3],
               "examiner": [(t.question, t.answer, t.trajectory.text[:300]) for t in tasks[:3]]}
    return out, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2")
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--variants", default="baseline,current", help="comma list, or 'all'")
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--examiner", type=int, default=16)
    p.add_argument("--temps", default="1.0,0", help="student temperatures (0 = greedy)")
    p.add_argument("--examiner-temps", default="", help="examiner temperatures (default: the config's)")
    p.add_argument("--top-p", type=float, default=None, help="default: the config's")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--samples", action="store_true", help="print a few trajectories per variant to stderr")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from piplay_ray import assets
    from piplay_ray.config import load_config
    from piplay_ray.engines import make_engine
    from piplay_ray.method import protocol
    from piplay_ray.method.examiner import ExaminerSampler
    from piplay_ray.method.qa import builtin_eval_set
    from piplay_ray.retrieval.corpus import Corpus

    cfg = load_config(args.config)
    path = str(assets.resolve_model(args.model))
    corpus = assets.corpus_path()
    examples = builtin_eval_set(corpus, args.questions, seed=0)
    sampler = ExaminerSampler(Corpus(corpus), cfg.examiner.hop_weights, seed=0)
    ex_docs, ex_hops = sampler.sample(args.examiner)
    temps = [float(t) for t in args.temps.split(",")]
    ex_temps = [float(t) for t in args.examiner_temps.split(",")] if args.examiner_temps else [cfg.rollout.temperature]
    top_p = cfg.rollout.top_p if args.top_p is None else args.top_p
    search = LocalSearch(cfg.search)
    tok = AutoTokenizer.from_pretrained(path)
    t0 = time.perf_counter()
    engine = make_engine("vllm", path, cfg.rollout, dtype=args.dtype, seed=0)
    result = {"model": args.model, "questions": len(examples), "examiner_prompts": len(ex_docs),
              "hops": ex_hops, "max_tokens_per_turn": cfg.rollout.max_tokens_per_turn,
              "top_p": top_p, "startup_s": round(time.perf_counter() - t0, 1), "variants": {}}
    table = variants(protocol)
    names = list(table) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(table)}")

    async def run_all():  # one event loop: the async engine stays bound to the loop it first ran on
        for name in names:
            with patched(protocol, table[name]):
                row, samples = await run_variant(engine, search, tok, cfg, examples, ex_docs, ex_hops, temps,
                                                 ex_temps, top_p)
            result["variants"][name] = row
            print(f"[adherence] {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
            if args.samples:
                print(json.dumps(samples, indent=1), file=sys.stderr, flush=True)

    asyncio.run(run_all())
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
