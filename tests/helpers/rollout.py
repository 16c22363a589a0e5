"""The tiny model taught to search (the `agent_model` fixture in conftest.py builds it once)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from piplay_ray.method import protocol as P

QUESTIONS = ["Who painted the Mona Lisa?", "What is the largest planet?", "Where is Mount Everest?",
             "Who wrote Hamlet?", "What language is spoken in Brazil?", "When did World War II end?"]


QUERY = "capital of France"  # what the taught model searches for


def train_agent_model(tiny_model: str, out) -> str:
    """The tiny model trained to search (always for QUERY), read the evidence, then write `<answer>`."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(0)
    rows = []
    for i, q in enumerate(QUESTIONS):
        prompt = P.student_prompt_ids(tok, q)
        evidence = f"Doc 1 (Title: {q.split()[-1]}) some retrieved text number {i}."
        resp = f"{P.SEARCH_OPEN}{QUERY}{P.SEARCH_CLOSE}{P.information_block(evidence)}{P.ANSWER_OPEN}yes{P.ANSWER_CLOSE}"
        rows.append((prompt, list(tok(resp, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for j, (p, r) in enumerate(rows):
        ids[j, : len(p) + len(r)] = torch.tensor(p + r)
        labels[j, len(p) : len(p) + len(r)] = torch.tensor(r)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model: one thread is faster than two contended ones
    for _ in range(80):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
