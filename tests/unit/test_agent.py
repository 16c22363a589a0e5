"""The agent loop with a scripted engine: exact tokens, mask, logprobs and turn structure."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from piplay_ray.engines.base import Engine, Generation, SamplingSpec, TopK
from piplay_ray.method import protocol as P
from piplay_ray.method.agent import run_agent, search_once
from piplay_ray.records import Doc, Hop


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


class ScriptedEngine(Engine):
    """Plays back fixed turns; records every input so the test can check token-in/token-out."""

    def __init__(self, turns: list[list[int]], finish: list[str] | None = None, delay: float = 0.0):
        self.turns, self.finish, self.delay = turns, finish, delay
        self.inputs: list[list[int]] = []
        self.specs: list[SamplingSpec] = []

    async def generate(self, prompt_ids, spec):
        i = len(self.inputs)
        self.inputs.append(list(prompt_ids))
        self.specs.append(spec)
        if self.delay:
            await asyncio.sleep(self.delay)
        ids = self.turns[i][: spec.max_tokens]
        finish = self.finish[i] if self.finish else "stop" if len(ids) == len(self.turns[i]) else "length"
        return Generation(ids, [-0.5 - 0.01 * k for k in range(len(ids))], finish)

    async def prompt_topk(self, token_ids, start, k):
        return TopK([], [])

    def update_weights(self, version, weights):
        pass


class FakeSearch:
    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.queries: list[str] = []
        self.delay, self.fail = delay, fail
        self.in_flight = self.max_in_flight = 0

    async def search(self, query: str, topk: int | None = None):
        self.queries.append(query)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.delay:
            await asyncio.sleep(self.delay)
        self.in_flight -= 1
        if self.fail:
            raise ConnectionError("backend down")
        doc = Doc(id="3", title="Paris", contents="Paris is the capital of France.")
        return Hop(query=query, docs=[doc]), f"Doc 1 (Title: Paris) {doc.contents} [{query}]"


def enc(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_search_then_answer_exact_tokens(tok):
    prompt = P.student_prompt_ids(tok, "What is the capital of France?")
    t1 = enc(tok, "<think>look it up</think><search>capital of France</search>")
    t2 = enc(tok, "<answer>Paris</answer>")
    engine, search = ScriptedEngine([t1, t2]), FakeSearch()
    spec = SamplingSpec(max_tokens=100, temperature=1.0, seed=5)
    traj = asyncio.run(run_agent(engine, search, tok, prompt, spec, max_turns=4, version=3))

    info = enc(tok, P.information_block("Doc 1 (Title: Paris) Paris is the capital of France. [capital of France]"))
    assert traj.prompt_ids == prompt
    assert traj.response_ids == t1 + info + t2
    assert traj.mask == [1] * len(t1) + [0] * len(info) + [1] * len(t2)
    assert traj.logprobs == [-0.5 - 0.01 * k for k in range(len(t1))] + [0.0] * len(info) + \
        [-0.5 - 0.01 * k for k in range(len(t2))]
    assert (traj.turns, traj.finish_reason, traj.answer, traj.version) == (2, "answer", "Paris", 3)
    assert [h.query for h in traj.hops] == ["capital of France"] == search.queries
    assert traj.hops[0].docs[0].title == "Paris"
    # token-in: the second turn continues exactly the ids so far; stop strings and per-turn seeds are set
    assert engine.inputs == [prompt, prompt + t1 + info]
    assert all(s.stop == P.STOP_STRINGS for s in engine.specs) and [s.seed for s in engine.specs] == [5, 6]
    assert traj.text == tok.decode(t1 + info + t2)


def test_answer_without_search(tok):
    t1 = enc(tok, "<answer>Rome</answer>")
    traj = asyncio.run(run_agent(ScriptedEngine([t1]), FakeSearch(), tok, [1, 2], SamplingSpec(50), max_turns=3))
    assert (traj.response_ids, traj.mask, traj.turns, traj.answer, traj.hops) == (t1, [1] * len(t1), 1, "Rome", [])
    assert traj.finish_reason == "answer"


@pytest.mark.parametrize("text, gen_finish, finish", [
    ("I do not know", "eos", "eos"),
    ("<think>long thinking", "length", "length"),
    ("<search></search>", "stop", "invalid"),
    ("<information>made up</information><answer>x", "eos", "eos"),
])
def test_invalid_turn_ends(tok, text, gen_finish, finish):
    t1 = enc(tok, text)
    traj = asyncio.run(run_agent(ScriptedEngine([t1], [gen_finish]), FakeSearch(), tok, [1], SamplingSpec(50), 3))
    assert traj.finish_reason == finish and traj.answer is None and traj.turns == 1 and traj.extra["error"]
    assert traj.response_ids == t1 and traj.mask == [1] * len(t1)


def test_max_turns_and_failed_search(tok):
    turn = enc(tok, "<search>q</search>")
    search = FakeSearch(fail=True)
    traj = asyncio.run(run_agent(ScriptedEngine([turn] * 3), search, tok, [1], SamplingSpec(50), max_turns=2))
    assert traj.finish_reason == "max_turns" and traj.turns == 2
    assert len(traj.hops) == 1 and not traj.hops[0].ok and "backend down" in traj.hops[0].error
    info = enc(tok, P.information_block("Search failed: ConnectionError: backend down"))
    assert traj.response_ids == turn + info + turn  # the last turn's search is not run: no turn left
    assert traj.mask == [1] * len(turn) + [0] * len(info) + [1] * len(turn)


def test_token_budget(tok):
    turn = enc(tok, "<search>q</search>")
    info_len = len(enc(tok, P.information_block("Doc 1 (Title: Paris) Paris is the capital of France. [q]")))
    # room for the first turn and its evidence, then 3 tokens: the second turn is cut to 3 tokens
    limit = len(turn) + info_len + 3
    engine = ScriptedEngine([turn, turn, turn])
    traj = asyncio.run(run_agent(engine, FakeSearch(), tok, [1], SamplingSpec(50), 5, max_response_tokens=limit))
    assert engine.specs[1].max_tokens == 3 and len(traj.response_ids) == limit
    assert traj.finish_reason == "length"
    # evidence that does not fit ends the trajectory without inserting it
    traj = asyncio.run(run_agent(ScriptedEngine([turn]), FakeSearch(), tok, [1, 2, 3], SamplingSpec(50), 5,
                                 max_context=3 + len(turn) + 4))
    assert traj.finish_reason == "length" and traj.response_ids == turn and len(traj.hops) == 1


def test_examiner_question(tok):
    t1 = enc(tok, "<search>Paris</search>")
    t2 = enc(tok, "<question>What city is the capital of France?</question><answer>Paris</answer>")
    traj = asyncio.run(run_agent(ScriptedEngine([t1, t2]), FakeSearch(), tok, [1], SamplingSpec(80), 4,
                                 role="examiner"))
    assert traj.finish_reason == "question" and traj.answer == "Paris" and traj.role == "examiner"
    assert traj.extra["question"] == "What city is the capital of France?" and len(traj.hops) == 1


def test_trajectories_overlap_while_searching(tok):
    """Many rollouts on one loop: waiting on search does not serialise them."""
    t1, t2 = enc(tok, "<search>q</search>"), enc(tok, "<answer>a</answer>")

    search = FakeSearch(delay=0.3)

    async def many():
        return await asyncio.gather(*[run_agent(ScriptedEngine([t1, t2], delay=0.05), search, tok, [1],
                                                SamplingSpec(50), 3) for _ in range(10)])

    trajs = asyncio.run(many())
    assert search.max_in_flight == 10  # every rollout's search was pending at once (serial: 1)
    assert all(t.answer == "a" for t in trajs)


def test_search_once_adapts_pool_results():
    class Result:
        text = "Doc 1 (Title: T) x"

        def to_hop(self):
            return Hop("q", [Doc("1", "T", "x")])

    class Pool:
        async def search_async(self, queries, topk=None):
            assert queries == ["q"]
            return [Result()]

    hop, text = asyncio.run(search_once(Pool(), "q"))
    assert hop.docs[0].title == "T" and text == Result.text


def test_evidence_is_cut_to_the_tool_response_token_cap(tok):
    """rollout.max_info_tokens: the evidence text inside <information> is cut to that many tokens."""
    t1 = enc(tok, "<search>capital of France</search>")
    t2 = enc(tok, "<answer>Paris</answer>")
    evidence = "Doc 1 (Title: Paris) Paris is the capital of France. [capital of France]"
    cut = tok.decode(enc(tok, evidence)[:5])
    assert len(enc(tok, evidence)) > 5 and len(cut) < len(evidence)
    traj = asyncio.run(run_agent(ScriptedEngine([t1, t2]), FakeSearch(), tok, [1, 2], SamplingSpec(100),
                                 max_turns=3, max_info_tokens=5))
    assert traj.response_ids == t1 + enc(tok, P.information_block(cut)) + t2
    uncapped = asyncio.run(run_agent(ScriptedEngine([t1, t2]), FakeSearch(), tok, [1, 2], SamplingSpec(100),
                                     max_turns=3, max_info_tokens=1000))
    assert uncapped.response_ids == t1 + enc(tok, P.information_block(evidence)) + t2


def test_a_cut_evidence_cuts_the_hop_to_what_the_agent_saw(tok):
    """The QCP keeps the evidence exactly as the examiner saw it: after the token cap, the hop's documents are
    the ones (and the part of the one) the cut text shows, not what the search env returned."""
    from piplay_ray.method.evidence import format_docs

    docs, text = format_docs([Doc("1", "Paris", "Paris is the capital of France."),
                              Doc("2", "Lyon", "Lyon is a city on the Rhone and the Saone rivers.")], 64)

    class TwoDocs:
        async def search(self, query, topk=None):
            return Hop(query=query, docs=docs), text

    t1, t2 = enc(tok, "<search>French cities</search>"), enc(tok, "<answer>Paris</answer>")
    first_line = enc(tok, text.splitlines()[0])
    for cap, want in [(len(enc(tok, text)), docs), (len(first_line), docs[:1])]:
        traj = asyncio.run(run_agent(ScriptedEngine([t1, t2]), TwoDocs(), tok, [1, 2], SamplingSpec(100),
                                     max_turns=3, max_info_tokens=cap))
        assert traj.hops[0].docs == want
    ids, head = enc(tok, text), len(text.splitlines()[0]) + len("\nDoc 2 (Title: Lyon) ")
    cap = next(c for c in range(len(ids)) if len(tok.decode(ids[:c])) > head + 3)  # into the second's text
    seen = tok.decode(ids[:cap])
    traj = asyncio.run(run_agent(ScriptedEngine([t1, t2]), TwoDocs(), tok, [1, 2], SamplingSpec(100),
                                 max_turns=3, max_info_tokens=cap))
    first, second = traj.hops[0].docs
    assert first == docs[0] and second.id == "2" and second.contents and second.contents in docs[1].contents
    assert seen.endswith(second.contents) and len(second.contents) < len(docs[1].contents)


class VersionedEngine(ScriptedEngine):
    """Says which version made each token: the weights changed during its second turn."""

    def __init__(self, turns, versions):
        super().__init__(turns)
        self.versions = versions

    async def generate(self, prompt_ids, spec):
        gen = await super().generate(prompt_ids, spec)
        gen.versions = self.versions[len(self.inputs) - 1][: len(gen.token_ids)]
        return gen


def test_a_trajectory_that_spans_a_weight_update_records_each_tokens_version(tok):
    """Per-token versions survive the agent loop (inserted search results take their turn's), and the
    trajectory's version is its oldest generated token's: what the replay bound reads."""
    t1 = enc(tok, "<search>capital of France</search>")
    t2 = enc(tok, "<answer>Paris</answer>")
    v2 = [4] * 2 + [5] * (len(t2) - 2)  # the update landed after two tokens of the second turn
    engine = VersionedEngine([t1, t2], [[4] * len(t1), v2])
    traj = asyncio.run(run_agent(engine, FakeSearch(), tok, [1, 2], SamplingSpec(100), max_turns=3, version=4))
    info = len(traj.response_ids) - len(t1) - len(t2)
    assert traj.versions == [4] * len(t1) + [4] * info + v2
    assert traj.version == 4 and traj.finish_reason == "answer"
    engine = VersionedEngine([t1, t2], [[5] * len(t1), [6] * len(t2)])  # all of it newer than its start
    assert asyncio.run(run_agent(engine, FakeSearch(), tok, [1, 2], SamplingSpec(100), 3, version=4)).version == 5


def test_token_staleness_counts_trained_tokens_only():
    from piplay_ray.records import Experience

    e = Experience("g", "student", [1], [5, 6, 7, 8], [1, 0, 1, 1], [0.0] * 4, 1.0, 0.5, 3, versions=[3, 3, 4, 5])
    assert e.token_staleness(6) == [3, 2, 1]
    assert Experience("g", "student", [1], [5, 6], [1, 1], [0.0] * 2, 1.0, 0.5, 3).token_staleness(4) == [1, 1]
