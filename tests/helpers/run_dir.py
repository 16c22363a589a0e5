"""Writes a small, realistic run directory in the contract format (config.yaml, metrics.jsonl, tasks/,
samples/, eval/*/metrics.json, health.json, logs/) for the metrics and dashboard tests. Metrics, health and samples go
through the real `MetricsSink`, so the dashboard tests also cover what the sink writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from piplay_ray.config import LoggingConfig
from piplay_ray.method.qa import QAExample
from piplay_ray.method.scores import record, summarize
from piplay_ray.monitor.metrics import MetricsSink
from piplay_ray.records import Doc, Hop, Task, Trajectory, to_dict

XSS_TASK_ID = "task-xss"
XSS_TEXT = '<script>window.__pwned=1</script><img src=x onerror="document.title=\'PWNED\'">'

FACTS = [  # (question, answer, hops as (query, doc title, doc text))
    ("In which city was the composer of the Brandenburg Concertos born?", "Eisenach",
     [("Brandenburg Concertos composer", "Brandenburg Concertos",
       "The Brandenburg Concertos are a collection of six instrumental works by Johann Sebastian Bach."),
      ("Johann Sebastian Bach birthplace", "Johann Sebastian Bach",
       "Johann Sebastian Bach was a German composer born in Eisenach in 1685.")]),
    ("What river flows through the capital of Hungary?", "Danube",
     [("capital of Hungary", "Budapest", "Budapest is the capital and most populous city of Hungary."),
      ("river through Budapest", "Danube", "The Danube flows through Budapest, dividing Buda and Pest.")]),
    ("Which element has atomic number 26?", "Iron",
     [("atomic number 26", "Iron", "Iron is a chemical element; it has symbol Fe and atomic number 26.")]),
    ("Who wrote the novel that introduced Sherlock Holmes?", "Arthur Conan Doyle",
     [("first Sherlock Holmes novel", "A Study in Scarlet",
       "A Study in Scarlet is an 1887 novel that introduced Sherlock Holmes."),
      ("A Study in Scarlet author", "Arthur Conan Doyle",
       "Sir Arthur Conan Doyle was a British writer, the creator of Sherlock Holmes."),
      ("Arthur Conan Doyle nationality", "Arthur Conan Doyle", "Conan Doyle was born in Edinburgh.")]),
]


def _tokens(text: str) -> list[str]:
    """Rough sub-word pieces (the real driver writes the tokenizer's decoded tokens)."""
    out: list[str] = []
    for word in text.split(" "):
        piece = (" " if out else "") + word
        while len(piece) > 6:
            out.append(piece[:6])
            piece = piece[6:]
        out.append(piece)
    return out


def _student_sample(task: Task, rng: random.Random, correct: bool, step: int, version: int,
                    answer: str | None = None) -> dict:
    """A student trajectory (model turns with KL, retrieved blocks with null KL) and its sample record."""
    tokens: list[str] = []
    kls: list[float | None] = []

    def model(text: str, hot: float) -> None:
        for tok in _tokens(text):
            tokens.append(tok)
            kls.append(round(rng.expovariate(1.0 / hot), 4))

    def env(text: str) -> None:
        for tok in _tokens(text):
            tokens.append(tok)
            kls.append(None)

    hops = []
    model(f"<think>I should look up: {task.question}</think>\n", 0.05)
    for hop in task.qcp[: max(1, len(task.qcp) - (0 if correct else 1))]:
        model(f"<search>{hop.query}</search>", 0.2)
        env("\n<information>" + " ".join(f"({d.title}) {d.contents}" for d in hop.docs) + "</information>\n")
        hops.append(hop)
    final = answer if answer is not None else (task.answer if correct else "Vienna")
    model(f"<think>The evidence points to {final}.</think>\n<answer>{final}</answer>", 0.1 if correct else 0.9)
    traj = Trajectory(prompt_ids=[1, 2, 3], response_ids=list(range(len(tokens))),
                      mask=[0 if k is None else 1 for k in kls], logprobs=[0.0] * len(tokens), hops=hops,
                      answer=final, finish_reason="answer", turns=len(hops) + 1, version=version,
                      role="student", text="".join(tokens))
    return {"task": to_dict(task), "trajectory": to_dict(traj), "reward": 1.0 if correct else 0.0,
            "tokens": tokens, "token_kl": kls}


def _task(i: int, iteration: int, question: str, answer: str, hops: list) -> Task:
    qcp = [Hop(query=q, docs=[Doc(id=f"d{i}-{j}", title=t, contents=c, score=10.0 - j)])
           for j, (q, t, c) in enumerate(hops)]
    return Task(id=f"it{iteration}-t{i}", question=question, answer=answer, hops=len(hops),
                source=Doc(id=f"src{i}", title=hops[-1][1], contents=hops[-1][2]), qcp=qcp,
                flags={"nonempty": True, "no_leak": True}, format_reward=0.2, iteration=iteration)


def write_run(run_dir: str | Path, *, iterations: int = 3, steps_per_phase: int = 4, seed: int = 0,
              group_size: int = 4, xss: bool = True) -> dict:
    """Write the run; returns facts the tests check against (task ids, record count, last step)."""
    run_dir = Path(run_dir)
    rng = random.Random(seed)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(f"run:\n  name: fixture\nschedule:\n  iterations: {iterations}\n")
    (run_dir / "logs" / "driver.log").write_text("driver started\n")
    sink = MetricsSink(run_dir, LoggingConfig(tensorboard=False))
    step, records, task_ids = 0, 0, []
    lam = [0.03, 0.003, 0.002]
    _write_eval(run_dir, "before-training", 0.1)
    for it in range(iterations):
        tasks = [_task(i, it, q, a, h) for i, (q, a, h) in enumerate(FACTS)]
        if xss and it == iterations - 1:
            bad = _task(99, it, "Which tag is " + XSS_TEXT + "?", XSS_TEXT, FACTS[0][2])
            bad.id = XSS_TASK_ID
            bad.qcp[0].query = XSS_TEXT
            bad.qcp[0].docs[0].title = XSS_TEXT
            tasks.append(bad)
        for _ in range(steps_per_phase):  # examiner phase
            step += 1
            ks = [rng.randint(0, group_size) for _ in range(8)]
            sink.log({"examiner/difficulty_reward": 0.2 + 0.1 * it + rng.random() * 0.1,
                      "examiner/gate_pass_rate": 0.7 + 0.05 * it, "examiner/attempts": 4,
                      **{f"examiner/gate_pass_rate_h{h}": 0.9 - 0.1 * h + 0.05 * it for h in range(1, 5)},
                      "examiner/solve_rate_hist": [k / group_size for k in ks],
                      "rollout/searches_per_traj": 1.5 + 0.2 * it, "rollout/answer_len": 3.0 + rng.random(),
                      "throughput/rollout_tokens_per_s": 900 + 50 * rng.random(),
                      "throughput/learner_tokens_per_s": 2400 + 100 * rng.random(),
                      "weight_sync/seconds": 0.4 + 0.1 * rng.random(), "replay/staleness": rng.randint(0, 1),
                      "learner/idle_frac": 0.3 * rng.random(), "search/tool_failures": 0},
                     iteration=it, phase="examiner", step=step)
            records += 1
        task_dir = run_dir / "tasks"
        task_dir.mkdir(exist_ok=True)
        (task_dir / f"iter-{it}.jsonl").write_text("".join(json.dumps(to_dict(t)) + "\n" for t in tasks))
        task_ids += [t.id for t in tasks]
        sink.log({"tasks/size": len(tasks), "tasks/examiner_written": len(tasks) - 1, "tasks/rule_built": 1},
                 iteration=it, phase="examiner", step=step)
        records += 1
        for s in range(steps_per_phase):  # student phase
            step += 1
            em = min(1.0, 0.2 + 0.15 * it + 0.03 * s)
            sink.log({"student/reward": em + 0.02, "student/em": em,
                      "loss/distill_kl": 0.8 / (1 + step), "loss/policy_kl": 0.01 * step,
                      "loss/entropy": 1.2 - 0.02 * step, "loss/clip_frac": 0.05 + 0.01 * rng.random(),
                      "student/answer_rate": 0.75 + 0.05 * it, "student/groups_with_signal": 0.5,
                      "schedule/lambda": lam[min(it, 2)], "rollout/searches_per_traj": 1.2 + 0.1 * s,
                      "rollout/answer_len": 2.5, "throughput/rollout_tokens_per_s": 1000 + 40 * s,
                      "throughput/learner_tokens_per_s": 2500.0, "weight_sync/seconds": 0.5,
                      "replay/staleness": 1, "learner/idle_frac": 0.2, "search/tool_failures": s % 2},
                     iteration=it, phase="student", step=step)
            records += 1
            samples = []
            for t in tasks:
                if t.id == XSS_TASK_ID:
                    samples.append(_student_sample(t, rng, False, step, step, answer=XSS_TEXT))
                    continue
                for g in range(2):
                    samples.append(_student_sample(t, rng, (g + s + it) % 3 != 0, step, step))
            sink.write_samples("student", step, samples)
        sink.log({"eval/em": 0.25 + 0.1 * it}, iteration=it, phase="eval", step=step)
        records += 1
        _write_eval(run_dir, f"iter-{it}", 0.25 + 0.1 * it)
    sink.write_health({"search-env-0": {"alive": True, "restarts": 0, "last_error": None},
                       "rollout-student-0": {"alive": True, "restarts": 1,
                                             "last_error": "RayActorError: " + XSS_TEXT},
                       "teacher": {"alive": False, "restarts": 3, "last_error": "OOM while scoring"}})
    sink.close()
    return {"task_ids": task_ids, "records": records, "last_step": step, "xss_task": XSS_TASK_ID if xss else None}


def _write_eval(run_dir: Path, name: str, em: float, n: int = 16) -> None:
    """eval/NAME/ as `evaluation.write_results` writes it: `n` natural questions (the first em·n right) and n/2
    rule-built ones (half right), with their per-example records."""
    right = round(em * n)
    records = [record(QAExample(f"n{i}", f"natural {i}?", ["yes"], "natural", "single" if i % 3 else "bridge"),
                      "yes" if i < right else "no", searches=1) for i in range(n)]
    records += [record(QAExample(f"r{i}", f"rule {i}?", ["yes"], "rule", "single"), "yes" if i % 2 else "no")
                for i in range(n // 2)]
    (run_dir / "eval" / name).mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / name / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "eval" / name / "metrics.json").write_text(json.dumps({"summary": summarize(records),
                                                                      "examples": len(records)}))
