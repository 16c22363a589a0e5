"""Examiner: sampler, task building, rewards over a batch, task set save/load (no model, no cluster)."""

from __future__ import annotations

from collections import Counter

import pytest

from piplay_ray.config import ExaminerConfig
from piplay_ray.method.examiner import (
    ExaminerSampler,
    build_task,
    examiner_rewards,
    load_tasks,
    save_tasks,
    select_tasks,
)
from piplay_ray.records import Doc, Hop, Task, Trajectory
from piplay_ray.rundir import task_set_path

DOCS = [Doc(str(i), f"T{i}", f'"T{i}"\nbody {i}') for i in range(50)]
SOURCE = Doc("7", "Marie Curie", '"Marie Curie"\nMarie Curie was a physicist born in Warsaw.')
WARSAW = Doc("9", "Warsaw", '"Warsaw"\nWarsaw is the capital of Poland, on the Vistula river.')
CFG = ExaminerConfig()


def test_sampler_without_replacement_and_seeded():
    s = ExaminerSampler(DOCS, CFG.hop_weights, seed=3)
    docs, hops = s.sample(20)
    more, _ = s.sample(30)
    ids = [d.id for d in docs + more]
    assert sorted(ids, key=int) == [d.id for d in DOCS]  # one full pass: every doc exactly once
    assert all(h in (1, 2, 3, 4) for h in hops)
    s2 = ExaminerSampler(DOCS, CFG.hop_weights, seed=3)
    assert [d.id for d in s2.sample(20)[0]] == ids[:20]  # same seed, same draws
    s2.start_iteration(1)
    assert [d.id for d in s2.sample(20)[0]] != ids[:20]  # a new iteration reshuffles
    s3 = ExaminerSampler(DOCS, CFG.hop_weights, seed=4)
    assert [d.id for d in s3.sample(20)[0]] != ids[:20]
    # past the corpus size a new permutation starts: 60 draws cover all 50, none more than twice
    s4 = ExaminerSampler(DOCS, seed=0)
    counts = Counter(d.id for d in s4.sample(60)[0])
    assert len(counts) == 50 and max(counts.values()) == 2


def test_sampler_hop_weights():
    s = ExaminerSampler(DOCS, [4, 3, 2, 1], seed=0)
    hops = s.sample_hops(20000)
    freq = Counter(hops)
    for h, p in zip((1, 2, 3, 4), (0.4, 0.3, 0.2, 0.1), strict=True):
        assert abs(freq[h] / 20000 - p) < 0.015
    assert set(ExaminerSampler(DOCS, [0, 1], seed=0).sample_hops(100)) == {2}
    with pytest.raises(ValueError):
        ExaminerSampler(DOCS, [0, 0])
    with pytest.raises(ValueError):
        ExaminerSampler([], [1])


def _traj(text: str, hops: list[Hop], finish: str = "question", question=None, answer=None) -> Trajectory:
    extra = {"question": question} if question else {}
    return Trajectory(prompt_ids=[1, 2], response_ids=[3, 4, 5], mask=[1, 0, 1], logprobs=[-0.5, 0.0, -0.2],
                      hops=hops, answer=answer, finish_reason=finish, turns=len(hops) + 1, version=4,
                      role="examiner", text=text, extra=extra)


def test_build_task_from_trajectory():
    hops = [Hop("Marie Curie birthplace", [WARSAW, SOURCE]), Hop("Warsaw river", [WARSAW])]
    text = ("her birthplace first</think><search>Marie Curie birthplace</search>\n<information>…</information>"
            "<think>now its river</think><search>Warsaw river</search><information>…</information>"
            "<think>done</think><question>Which river flows through the city where Marie Curie was born?</question>"
            "<answer>Vistula</answer>")
    task = build_task(_traj(text, hops), SOURCE, 3, CFG, iteration=2)
    assert task.question == "Which river flows through the city where Marie Curie was born?"
    assert task.answer == "Vistula"
    assert [h.query for h in task.qcp] == ["Marie Curie birthplace", "Warsaw river"]
    assert [[d.id for d in h.docs] for h in task.qcp] == [["9", "7"], ["9"]]
    assert task.valid and task.format_reward == 1.0 and task.iteration == 2 and task.hops == 3
    assert task.trajectory.version == 4 and task.trajectory.mask == [1, 0, 1] and task.version == 4
    # fields set by the agent loop take precedence over re-parsing the text; Dr. Zero's r_f: no think (0),
    # 2 valid searches for 4 hops (3/4), a supported answer (1) -> (1 + 0 + 3/4 + 1) / 4
    t2 = build_task(_traj("junk", hops, question="Which river crosses it?", answer="Vistula"), SOURCE, 4, CFG)
    assert t2.question == "Which river crosses it?" and t2.format_reward == pytest.approx(2.75 / 4)
    search_only = CFG.model_copy(update={"format_reward": "search"})
    assert build_task(_traj("junk", hops, question="Which river crosses it?", answer="Vistula"), SOURCE, 4,
                      search_only).format_reward == pytest.approx(3 / 4)


def test_build_task_malformed_is_invalid_not_an_error():
    for traj in [_traj("", [], finish="length"), _traj("<question></question><answer>x", [], "invalid"),
                 _traj("<question>Who?</question><answer>Nobody here</answer>", [], "question")]:
        task = build_task(traj, SOURCE, 2, CFG)
        assert not task.valid
        # the last one passes the integrity gate: partial credit (1 + think 0 + tool 0 + unsupported 0) / 4
        assert task.format_reward == (0.25 if traj.finish_reason == "question" else 0.0)
        assert build_task(traj, SOURCE, 2, CFG.model_copy(update={"format_reward": "search"})).format_reward == 0.0


def _task(q: str, a: str, h: int, valid: bool = True, r_f: float = 1.0) -> Task:
    return Task(id=q, question=q, answer=a, hops=h, source=SOURCE, qcp=[Hop("q", [WARSAW])],
                flags={"ok": valid}, format_reward=r_f if valid else 0.0)


def test_examiner_rewards_batch():
    tasks = [_task("a", "x", 1), _task("b", "x", 1), _task("c", "x", 2, valid=False), _task("d", "x", 2, r_f=0.5)]
    rewards, adv = examiner_rewards(tasks, [1, 3, None, 0], n=3, w_f=0.5)
    # by hand, n=3: k=1 -> 2/2 + .5 = 1.5; k=3 -> 0 + .5 = .5; invalid -> 0; k=0 -> 0 + .25
    assert rewards == pytest.approx([1.5, 0.5, 0.0, 0.25])
    # hop 1 {1.5, .5}: mean 1, sample std .5·√2 -> ±1/√2; hop 2 {0, .25}: mean .125, sample std .125·√2 -> ∓1/√2
    r = 2 ** -0.5
    assert adv == pytest.approx([r, -r, -r, r], rel=1e-4)
    _, raw = examiner_rewards(tasks, [1, 3, None, 0], n=3, w_f=0.5, std_normalize=False)
    assert raw == pytest.approx([0.5, -0.5, -0.125, 0.125])
    with pytest.raises(ValueError):
        examiner_rewards(tasks, [1], n=3, w_f=0.5)


def test_task_set_dedup_save_load(tmp_path):
    tasks = [_task("Who wrote it?", "A", 1), _task("who  wrote it", "B", 2), _task("Bad?", "C", 1, valid=False),
             _task("Where?", "D", 3), _task("When?", "E", 1)]
    tasks[0].trajectory = _traj("t", tasks[0].qcp, question="Who wrote it?", answer="A")
    chosen = select_tasks(tasks, size=10)
    assert [t.answer for t in chosen] == ["A", "D", "E"]
    assert [t.answer for t in select_tasks(tasks, size=2)] == ["A", "D"]
    path = save_tasks(task_set_path(tmp_path, 3), chosen)
    assert path == tmp_path / "tasks" / "iter-3.jsonl"
    back = load_tasks(path)
    assert back == chosen  # dataclass equality: every field round-trips, QCP docs and trajectory included
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="iter-3.jsonl:4"):
        load_tasks(path)
    with pytest.raises(FileNotFoundError):
        load_tasks(tmp_path / "missing.jsonl")
