"""The protocol warm start: cold-start SFT of both roles on rule-built demonstrations (`piplay warmup`).

A config names a warm start like a built-in model, ``model.base: builtin:smollm2-search``. The recipe (base
model, demonstration counts and hop mix, learning rate) is fixed here; its content hash — recipe, corpus,
search formatting, prompts, the demonstration code and the held-out evaluation ids — names the cached folder
``$PIPLAY_HOME/warmup/<name>-<hash>/{student,examiner}``, so it is built once and rebuilt only when something
it depends on changes. Training goes through the same DeepSpeed learner as RL (``objective="sft"``: NLL of
the model's own turns; inserted `<information>` tokens carry no loss).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from piplay_ray import assets
from piplay_ray.assets import RECIPES, recipe_name
from piplay_ray.config import Config
from piplay_ray.learner.learner import LearnerGroup
from piplay_ray.method import demos, protocol
from piplay_ray.method.evidence import format_docs
from piplay_ray.method.qa import held_out_articles
from piplay_ray.retrieval import make_retriever
from piplay_ray.retrieval.queries import clean_query
from piplay_ray.roles import MODELS, TRAINED


def held_out_ids(cfg: Config, corpus_path: str) -> list[str]:
    """Corpus ids of the built-in evaluation sets' articles: never in a demonstration."""
    return sorted(held_out_articles(corpus_path, cfg.eval.rule_size, cfg.run.seed))


def fingerprint(name: str, cfg: Config, corpus_path: str, held_out: list[str]) -> str:
    s = cfg.search
    parts = {"recipe": asdict(RECIPES[name]), "corpus": assets.sha256_file(Path(corpus_path)),
             "search": [s.retriever, s.topk, s.doc_token_budget, s.max_query_chars],
             "prompts": [protocol.STUDENT_INSTRUCTIONS, protocol.EXAMINER_INSTRUCTIONS, protocol.RESPONSE_PREFIX],
             "code": inspect.getsource(demos), "held_out": held_out}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _search_fn(search_cfg):
    """Batched search in this process, formatted exactly as the search env formats it for the agent."""

    retriever = make_retriever(search_cfg)

    def search(queries: list[str]) -> list:
        hits = retriever.search([clean_query(q, search_cfg.max_query_chars) for q in queries], search_cfg.topk)
        return [format_docs(docs, search_cfg.doc_token_budget) for docs in hits]

    return search


def _say(msg: str) -> None:
    print(f"[piplay warmup] {msg}", file=sys.stderr, flush=True)


def build(name: str, cfg: Config) -> Path:
    """The warm-start folder for recipe `name` under `cfg`'s corpus, search and evaluation set (cached)."""
    corpus = assets.resolve_corpus(cfg.search.corpus)
    held_out = held_out_ids(cfg, corpus)
    dest = assets.home() / "warmup" / f"{name}-{fingerprint(name, cfg, corpus, held_out)}"
    return assets.build_atomic(dest, lambda tmp: _train(name, cfg, corpus, set(held_out), tmp))  # reused if it verifies


def _train(name: str, cfg: Config, corpus: str, held_out: set[str], out: Path) -> dict:
    import ray
    from tqdm import tqdm
    from transformers import AutoTokenizer

    r = RECIPES[name]
    base = assets.resolve_model(r.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    articles = demos.load_articles(corpus)
    search = _search_fn(cfg.search)
    t0 = time.time()
    sets = {"student": demos.build_demos(articles, search, tokenizer, "student", r.student_demos, r.student_hops,
                                         held_out, r.seed, cfg.search.doc_token_budget),
            "examiner": demos.build_demos(articles, search, tokenizer, "examiner", r.examiner_demos,
                                          r.examiner_hops, held_out, r.seed + 1, cfg.search.doc_token_budget)}
    with open(out / "demos.jsonl", "w", encoding="utf-8") as f:
        for d in (d for ds in sets.values() for d in ds):
            f.write(json.dumps({"role": d.role, "question": d.question, "answer": d.answer,
                                "chain": [a.id for a in d.chain], "text": tokenizer.decode(d.response_ids)}) + "\n")
    tokens = sum(len(d.prompt_ids) + len(d.response_ids) for ds in sets.values() for d in ds)
    _say(f"{name}: {len(sets['student'])} student and {len(sets['examiner'])} examiner demonstrations "
         f"({tokens} tokens) in {time.time() - t0:.0f}s; training on {base}")
    lcfg = cfg.model_copy(deep=True)
    lcfg.model.examiner = lcfg.model.student = lcfg.model.teacher = base
    lcfg.learner.lr, lcfg.learner.offload_inactive = r.lr, False
    lcfg.learner.micro_batch_tokens = r.micro_batch_tokens
    lcfg.learner.lora.rank = 0  # the recipe (and its cache key) is full fine-tuning, whatever the run's LoRA
    lcfg.learner.num_cpus_per_rank = max(lcfg.learner.num_cpus_per_rank, os.cpu_count() or 1)  # nothing else runs
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    learner = LearnerGroup(lcfg, TRAINED)
    losses: dict[str, list[float]] = {role: [] for role in TRAINED}
    try:
        steps = [(role, ds[i : i + r.batch]) for _ in range(r.epochs) for role, ds in sets.items()
                 for i in range(0, len(ds), r.batch)]
        for role, batch in tqdm(steps, desc=f"warm start {name}", unit="step", file=sys.stderr):
            m = learner.train_step(role, [d.experience(i) for i, d in enumerate(batch)], objective="sft")
            losses[role].append(round(m["sft_nll"], 4))
        for role in TRAINED:
            learner.export_hf(role, out / role)
    finally:
        learner.shutdown()
        if started:
            ray.shutdown()
    _say(f"{name}: trained in {time.time() - t0:.0f}s; NLL per token "
         + ", ".join(f"{k} {v[0]:.3f} -> {v[-1]:.3f}" for k, v in losses.items() if v))
    return {"recipe": name, **asdict(r), "demos": {k: len(v) for k, v in sets.items()}, "tokens": tokens,
            "nll": losses, "held_out": len(held_out), "seconds": round(time.time() - t0, 1)}


def prepare(cfg: Config) -> Config:
    """`cfg` with every warm-start model spec replaced by its built folder (role by role; the teacher
    starts from the student's warm start). Builds what is missing."""
    model = cfg.model
    specs = {role: model.path_for(role) for role in MODELS}
    names = {recipe_name(s) for s in specs.values()} - {None}
    if not names:
        return cfg
    built = {n: build(n, cfg) for n in sorted(names)}
    cfg = cfg.model_copy(deep=True)
    for role, spec in specs.items():
        if (n := recipe_name(spec)) is not None:
            setattr(cfg.model, role, str(built[n] / ("student" if role == "teacher" else role)))
    return cfg
