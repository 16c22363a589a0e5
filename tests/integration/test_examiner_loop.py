"""The examiner through the real agent loop: a scripted engine and a fake search env must give the QCP
exactly as searched; then (slow) 16 real examiner attempts with SmolLM2 on the Wikipedia corpus."""

from __future__ import annotations

import asyncio
import json

import pytest

from piplay_ray.config import ExaminerConfig
from piplay_ray.engines.base import Engine, Generation, SamplingSpec
from piplay_ray.method import agent, protocol
from piplay_ray.method.examiner import build_task
from piplay_ray.records import Doc, Hop

SOURCE = Doc("7", "Marie Curie", '"Marie Curie"\nMarie Curie was a physicist born in Warsaw.')
RESULTS = {
    "Marie Curie birthplace": [Doc("9", "Warsaw", '"Warsaw"\nWarsaw is the capital of Poland.'),
                               Doc("7", "Marie Curie", SOURCE.contents)],
    "Warsaw river": [Doc("11", "Vistula", '"Vistula"\nThe Vistula is the longest river in Poland.')],
}
TURNS = [
    "<think>Her birthplace first.</think><search>Marie Curie birthplace</search>",
    "<search>Warsaw river</search>",
    "<question>Which river flows through the city where Marie Curie was born?</question>"
    "<answer>Vistula</answer>",
]


RAY_CPUS = 2


class ScriptedEngine(Engine):
    """Emits the scripted turns in order (as token ids), whatever the prompt; records what it was shown."""

    def __init__(self, tokenizer, turns):
        self.tok, self.turns, self.prompts = tokenizer, list(turns), []

    async def generate(self, prompt_ids, spec: SamplingSpec) -> Generation:
        self.prompts.append(list(prompt_ids))
        ids = self.tok(self.turns.pop(0), add_special_tokens=False)["input_ids"]
        return Generation(token_ids=ids, logprobs=[-0.1] * len(ids), finish_reason="stop")

    async def prompt_topk(self, token_ids, start, k):
        raise NotImplementedError

    def update_weights(self, version, weights):
        raise NotImplementedError


class FakeSearch:
    def __init__(self):
        self.queries = []

    async def search(self, query, topk=None):
        self.queries.append(query)
        docs = RESULTS.get(query, [])
        return Hop(query=query, docs=docs), "\n".join(f"Doc {i + 1} ({d.title}) {d.contents}"
                                                      for i, d in enumerate(docs))


def test_examiner_loop_builds_expected_qcp(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    engine, search = ScriptedEngine(tok, TURNS), FakeSearch()
    prompt = protocol.examiner_prompt_ids(tok, SOURCE, 3)
    spec = SamplingSpec(max_tokens=64, stop=protocol.STOP_STRINGS)
    traj = asyncio.run(agent.run_agent(engine, search, tok, prompt, spec, max_turns=4, role="examiner",
                                       version=2))
    assert search.queries == ["Marie Curie birthplace", "Warsaw river"]
    task = build_task(traj, SOURCE, 3, ExaminerConfig(), iteration=1)
    assert [h.query for h in task.qcp] == ["Marie Curie birthplace", "Warsaw river"]
    assert [[d.id for d in h.docs] for h in task.qcp] == [["9", "7"], ["11"]]
    assert task.qcp[0].docs == RESULTS["Marie Curie birthplace"]  # the documents exactly as returned
    assert task.question == "Which river flows through the city where Marie Curie was born?"
    assert task.answer == "Vistula"
    # Dr. Zero's r_f: only the first of 3 turns thinks before acting -> (1 + 1/3 + tool 1 + answer 1) / 4
    assert task.valid and task.format_reward == pytest.approx((3 + 1 / 3) / 4), task.flags
    assert task.version == 2
    assert task.trajectory.version == 2 and task.trajectory.role == "examiner"
    assert len(engine.prompts) == 3 and engine.prompts[0] == prompt


# ------------------------------------------------------------------------------------------ slow: SmolLM2


@pytest.mark.slow
def test_sixteen_examiner_attempts_smollm2(ray_local, smollm2, corpus_path, tmp_path):
    """16 examiner attempts with the embedded SmolLM2 through the real rollout pool and search env."""

    from piplay_ray.actors.rollout_pool import RolloutPool
    from piplay_ray.actors.search_env import SearchEnvPool
    from piplay_ray.config import load_config
    from piplay_ray.method.examiner import ExaminerSampler, save_tasks, write_tasks
    from piplay_ray.records import to_dict
    from piplay_ray.retrieval.corpus import Corpus

    cfg = load_config("configs/local.yaml", [f"search.corpus={corpus_path}", f"model.base={smollm2}"])
    search = SearchEnvPool(cfg.search)
    pool = RolloutPool.from_config("examiner", smollm2, cfg, search)
    sampler = ExaminerSampler(Corpus(corpus_path), cfg.examiner.hop_weights, seed=0)
    tasks = asyncio.run(write_tasks(pool, sampler, 16, cfg.examiner, iteration=0))
    save_tasks(tmp_path / "tasks.jsonl", tasks)
    assert len(tasks) == 16
    passed = [t for t in tasks if t.valid]
    fails = {k: sum(not t.flags.get(k, False) for t in tasks) for k in tasks[0].flags}
    print(json.dumps({"metric": "examiner_gate_pass", "attempts": 16, "passed": len(passed),
                      "hops": [t.hops for t in tasks], "flag_failures": fails}))
    for t in (passed or tasks)[:2]:
        print(json.dumps({k: v for k, v in to_dict(t).items() if k != "trajectory"}, ensure_ascii=False)[:3000])
    for t in tasks:
        assert len(t.qcp) == len(t.trajectory.hops) and t.trajectory.role == "examiner"
