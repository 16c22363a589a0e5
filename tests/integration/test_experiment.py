"""`piplay experiment`: the spec's errors, its runs in both task-set modes, and the paper's ablation arms end to
end on configs/tiny.yaml.

The experiment runs two arms of `teacher.privileged` (the default `qcp` is test_train_tiny's run; what each
arm renders is test_privileged's), one seed, each arm its own self-play (the default): each trains its own
examiner and writes its own task set; `none` must train without any teacher fields (no distillation term, λ
logged as 0); `answer` must score the student's tokens with the teacher (distillation logged). The shared
task sets (`task_sets: shared`) are checked by their runs' overrides here and by test_fault_driver's arm,
which trains on a given task set.
"""

from __future__ import annotations

import json

import pytest
import yaml
from helpers.runs import ROOT

from piplay_ray.cluster.run_tasks import DRIVER_LOG
from piplay_ray.commands.experiment import Experiment, load_spec
from piplay_ray.config import ConfigError
from piplay_ray.monitor.report import curve

ARMS = ("answer", "none")


def _spec(tmp_path, **over) -> str:
    spec = {"name": "arms", "config": str(ROOT / "configs" / "tiny.yaml"), "root": str(tmp_path / "exp"),
            "overrides": ["eval.rule_size=4", "schedule.examiner_steps=1", "schedule.student_steps=1",
                          "checkpoint.every=0", "rollout.engine=transformers", "logging.tensorboard=false"],
            "eval_every": 1, "seeds": [0], "baseline": "none",
            "arms": {arm: [f"teacher.privileged={arm}"] for arm in ARMS}} | over
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.parametrize("over, message", [
    ({"baseline": "qcp"}, "baseline: 'qcp' is not an arm"),
    ({"seeds": []}, "seeds"),
    ({"arms": {"none": ["teacher.privileged=sometimes"]}}, "teacher.privileged"),
    ({"eval_every": 0}, "eval_every"),
    ({"arms": {"none": ["teacher.privileged=none"], "big": ["model.base=builtin:smollm2"]}},
     "arms.big: model.base may not differ between arms"),
])
def test_a_bad_spec_names_the_key(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(_spec(tmp_path, **over))


def test_shipped_experiments_load():
    paths = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
    assert paths, "no experiment ships in configs/experiments"
    for path in paths:
        assert load_spec(path).baseline in load_spec(path).arms


@pytest.mark.parametrize("iterations, trains_student", [(1, False), (2, True)])
def test_the_shared_tasks_run_trains_a_student_only_when_a_later_examiner_faces_it(tmp_path, iterations,
                                                                                  trains_student):
    exp = Experiment(load_spec(_spec(tmp_path, task_sets="shared", overrides=[f"schedule.iterations={iterations}"])))
    (tasks, _, _, overrides), *arms = exp.runs()
    assert tasks == "tasks" and ("schedule.student_steps=0" in overrides) is not trains_student
    assert "examiner.task_set_size=4" in overrides  # what an arm's student phase trains: 2 steps x 2 tasks
    assert all("schedule.examiner_steps=0" in o and "eval.every=0" in o for *_, o in arms)
    assert all(f"examiner.task_sets_from={exp.tasks_dir}" in o for *_, o in arms)


def test_each_arm_runs_its_own_self_play_by_default(tmp_path):
    exp = Experiment(load_spec(_spec(tmp_path)))
    assert exp.spec.task_sets == "own" and all(seed is not None for _, seed, *_ in exp.runs())
    for *_, overrides in exp.runs():
        assert not any(o == "schedule.examiner_steps=0" or o.startswith("examiner.task_sets_from=") for o in overrides)
    with pytest.raises(ConfigError, match="task_sets"):
        load_spec(_spec(tmp_path, task_sets="borrowed"))


@pytest.mark.parametrize("task_sets, start0", [("shared", "tasks"), ("own", "answer")])
def test_each_seed_start_is_evaluated_once_by_its_first_run(tmp_path, task_sets, start0):
    """The seed sets the warm start and the held-out set: seed 0's start is the tasks run's evaluation when the
    task sets are shared, else its first arm's; seed 1's is its first arm's; every other arm takes its seed's
    start as step 0."""
    exp = Experiment(load_spec(_spec(tmp_path, seeds=[0, 1], task_sets=task_sets)))
    first = next(iter(exp.spec.arms))
    before = {(arm, seed): "eval.before_training=true" in o for arm, seed, _, o in exp.runs() if seed is not None}
    starts = {(first, 1)} | ({(first, 0)} if start0 == first else set())
    assert before == {(a, s): (a, s) in starts for a in ARMS for s in (0, 1)}
    assert exp.start_dir(0) == (exp.tasks_dir if start0 == "tasks" else exp.arm_dir(first, 0))
    assert exp.start_dir(1) == exp.arm_dir(first, 1)


@pytest.mark.parametrize("task_sets, want", [
    ("shared", [[("tasks", None)], [("answer", 0), ("answer", 1), ("none", 0)], [("none", 1)]]),
    ("own", [[("answer", 0), ("answer", 1)], [("none", 0), ("none", 1)]]),
])
def test_waves_run_each_seed_start_before_the_arms_that_read_it(tmp_path, task_sets, want):
    exp = Experiment(load_spec(_spec(tmp_path, seeds=[0, 1], task_sets=task_sets)))
    assert [[(arm, seed) for arm, seed, *_ in wave] for wave in exp.waves()] == want
    assert sorted(r for w in exp.waves() for r in w) == sorted(exp.runs())


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_arm_trains_its_own_examiner_and_student_and_a_second_run_reuses_them(
        tmp_path, tiny_model, corpus_path, capsys):
    """The arms run as Ray tasks (`parallel`: each a `piplay train` in cluster mode joined to the experiment's
    Ray cluster, the seed's start first); the second invocation runs here, one after another, and finds all
    done. The result files record each arm's own examiner steps."""
    import ray

    exp = Experiment(load_spec(_spec(tmp_path, parallel=True)))
    try:
        paths = exp.run()
    finally:
        ray.shutdown()
    runs = {arm: exp.arm_dir(arm, 0) for arm in ARMS}
    assert all("done: 2 learner steps" in (r / DRIVER_LOG).read_text() for r in runs.values())  # 1 + 1 each
    assert yaml.safe_load((runs["none"] / "config.yaml").read_text())["run"]["mode"] == "cluster"
    result = json.loads(paths["json"].read_text())
    assert result["task_sets"] == "own" and not exp.tasks_dir.exists()
    assert result["runs"] == [{"arm": arm, "seed": 0, "examiner_steps": 1, "student_steps": 1} for arm in ARMS]
    points = result["points"]
    assert {(p["arm"], p["student_step"]) for p in points} == {(a, s) for a in ARMS for s in (0, 1)}
    assert all(p["n"] == 4 and 0 <= p["em"] <= 1 for p in points)
    # the starting checkpoint is evaluated once, by the first arm, and is every arm's step 0
    assert len({(p["em"], p["f1"]) for p in points if p["student_step"] == 0}) == 1
    assert [p["student_step"] for p in curve(runs["none"] / "metrics.jsonl", "none", 0)] == [1]
    md = paths["md"].read_text()
    assert "| answer |" in md and paths["png"].read_bytes()[:4] == b"\x89PNG" and "own self-play" in md
    assert md.count("(4 pairs)") == len(ARMS) - 1  # paired by question against `none`
    assert "| answer | 0 | 1 | 1 |" in md and "| none | 0 | 1 | 1 |" in md  # each arm's own examiner step

    for arm in ARMS:
        run = runs[arm]
        tasks = json.loads((run / "accounting.json").read_text())["tasks"]["iter-0-tasks"]
        assert "from" not in tasks and tasks["examiner_version"] == 1  # written by this arm's own examiner
        assert set(tasks["trained"]) <= {json.loads(line)["id"] for line in (run / "tasks" / "iter-0.jsonl").open()}
        rows = _rows(run)
        (examiner,) = [r for r in rows if r["phase"] == "examiner" and "learner/version" in r]
        (student,) = [r for r in rows if r["phase"] == "student" and "learner/version" in r]
        (diag,) = [r for r in rows if r["phase"] == "student" and "student/reward" in r]
        assert "diag/answer_before_search" in diag and "rollout/ended_by_length" in diag
        if arm == "none":
            assert student["schedule/lambda"] == 0.0 and "loss/distill_kl" not in student
            assert "diag/kl_reasoning" not in diag and "teacher/shortened_contexts" not in diag
        else:
            assert student["schedule/lambda"] > 0 and "loss/distill_kl" in student
            assert diag["teacher/unscored"] == 0 and "diag/teacher_top1_agreement" in diag
        if arm == "answer":  # the answer itself is the privileged text: never in the question (gate)
            assert diag["diag/answer_only_in_teacher"] > 0

    stamps = {run: (run / "summary.json").stat().st_mtime_ns for _, _, run, _ in exp.runs()}
    capsys.readouterr()
    exp.spec.parallel = False
    exp.run()
    assert capsys.readouterr().out.count("finished before, kept") == len(ARMS)
    assert stamps == {run: (run / "summary.json").stat().st_mtime_ns for _, _, run, _ in exp.runs()}
