"""The multi-turn search agent loop, token-in/token-out.

Each turn continues the exact token sequence so far (prompt + everything sampled or inserted), stops at
`</search>`, `</answer>`, end of sequence or the token limit, and is parsed by :mod:`piplay_ray.method.protocol`.
A search is answered by the search env and its `<information>` block is appended as tokens with mask 0.
Model text is decoded only to parse it; the sampled ids are kept as sampled, never re-tokenised.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import replace

from piplay_ray.engines.base import Engine, SamplingSpec
from piplay_ray.method import protocol
from piplay_ray.method.evidence import shown_docs
from piplay_ray.records import Hop, Trajectory


async def search_once(search, query: str, topk: int | None = None) -> tuple[Hop, str]:
    """One search through the env, as (Hop, evidence text); a failing env becomes a failed Hop.

    Accepts the contract's `async search(query, topk) -> (Hop, text)` and the search env pool's
    batched `search_async([query], topk)` (an awaitable of SearchResult objects).
    """
    try:
        if hasattr(search, "search_async"):
            (result,) = await search.search_async([query], topk)
            return result.to_hop(), result.text
        out = search.search(query, topk)
        if inspect.isawaitable(out):
            out = await out
        hop, text = out
        return hop, text
    except Exception as e:  # the env never raises by contract; a broken transport must not kill a rollout
        # one line: a Ray error's traceback must not reach the model's context
        error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        return Hop(query=query, ok=False, error=error), f"Search failed: {error}"


async def run_agent(engine: Engine, search, tokenizer, prompt_ids: list[int], spec: SamplingSpec,
                    max_turns: int, role: str = "student", version: int = 0, max_response_tokens: int = 1024,
                    max_context: int | None = None, topk: int | None = None,
                    max_info_tokens: int | None = None) -> Trajectory:
    """Roll out one trajectory: at most `max_turns` model turns and `max_response_tokens` response tokens
    (generated and inserted together); `max_context` bounds prompt + response (the engine's model length);
    `max_info_tokens` cuts each search's evidence text to that many tokens (Dr. Zero's tool-response cap), and
    its Hop's documents to what the cut text shows.
    """
    traj = Trajectory(prompt_ids=list(prompt_ids), role=role, version=version)  # type: ignore[arg-type]
    limit = max_response_tokens
    if max_context is not None:
        limit = min(limit, max_context - len(prompt_ids))
    finish = "max_turns"
    turn_spec = replace(spec, stop=protocol.STOP_STRINGS)
    for turn in range(max_turns):
        budget = min(spec.max_tokens, limit - len(traj.response_ids))
        if budget <= 0:
            finish = "length"
            break
        seed = None if spec.seed is None else spec.seed + turn
        gen = await engine.generate(traj.prompt_ids + traj.response_ids,
                                    replace(turn_spec, max_tokens=budget, seed=seed))
        traj.response_ids += gen.token_ids
        traj.mask += [1] * len(gen.token_ids)
        traj.logprobs += list(gen.logprobs)
        traj.versions += gen.versions or [version] * len(gen.token_ids)  # an engine that does not say
        traj.turns += 1
        action = protocol.parse_turn(tokenizer.decode(gen.token_ids), role)

        if action.kind == "search":
            if turn + 1 == max_turns:
                break  # no turn left to read the results
            hop, evidence = await search_once(search, action.query, topk)
            traj.hops.append(hop)
            if max_info_tokens is not None:
                ids = tokenizer(evidence, add_special_tokens=False)["input_ids"]
                if len(ids) > max_info_tokens:  # the hop keeps what the agent sees: the QCP is what it saw
                    cut = tokenizer.decode(ids[:max_info_tokens])
                    hop.docs = shown_docs(hop.docs, len(os.path.commonprefix([evidence, cut])))
                    evidence = cut
            info = list(tokenizer(protocol.information_block(evidence), add_special_tokens=False)["input_ids"])
            room = limit - len(traj.response_ids)
            if len(info) >= room:  # the evidence does not fit with room for another turn
                finish = "length"
                break
            traj.response_ids += info
            traj.mask += [0] * len(info)
            traj.logprobs += [0.0] * len(info)
            traj.versions += [traj.versions[-1] if traj.versions else version] * len(info)
            continue
        if action.kind in ("answer", "question"):
            traj.answer = action.answer
            if action.question is not None:
                traj.extra["question"] = action.question
            finish = "question" if action.kind == "question" else "answer"
            break
        # invalid: end the trajectory (it earns no outcome reward); say why
        traj.extra["error"] = action.error
        finish = {"eos": "eos", "length": "length"}.get(gen.finish_reason, "invalid")
        break
    traj.finish_reason = finish  # type: ignore[assignment]
    traj.version = min((v for v, m in zip(traj.versions, traj.mask, strict=True) if m), default=version)
    traj.text = tokenizer.decode(traj.response_ids)
    return traj
