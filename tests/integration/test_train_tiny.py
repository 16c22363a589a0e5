"""Integration: the tiny run (conftest's `tiny_run`, one real run of configs/tiny.yaml) — every phase logs,
checkpoints, staleness bound, its dashboard. Resuming after a kill is test_fault_driver's; a finished run's
refusal and a changed config's are below.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.runs import ROOT, metrics


def test_every_phase_logs_metrics(tiny_run):
    rows = metrics(tiny_run.dir)
    phases = {r["phase"] for r in rows}
    assert {"examiner", "student"} <= phases
    learner = [r for r in rows if "learner/version" in r]
    assert [r["phase"] for r in learner] == ["examiner", "examiner", "student", "student"]
    assert [r["step"] for r in learner] == [1, 2, 3, 4]
    student = [r for r in rows if "student/reward" in r]
    assert student and all(0.0 <= r["student/reward"] <= 1.0 for r in student)
    assert any("examiner/difficulty_reward" in r for r in rows)
    assert any("loss/distill_kl" in r for r in rows if r["phase"] == "student")
    # method diagnostics of every student step, and the teacher's fitting counts
    for r in student:
        assert 0.0 <= r["diag/answer_before_search"] <= 1.0 and 0.0 <= r["diag/answer_only_in_teacher"] <= 1.0
        shortened = r["teacher/shortened_contexts"]
        assert shortened == int(shortened) and 0 <= shortened <= tiny_run.loop.cfg.student.tasks_per_step
        assert "diag/kl_reasoning" in r


def test_no_experience_beyond_the_staleness_bound(tiny_run):
    bound = 1  # configs/tiny.yaml: replay.max_staleness = 1
    steps = [r for r in metrics(tiny_run.dir) if "learner/version" in r]
    assert len(steps) == 4  # every learner step is checked
    for r in steps:
        # trained on experiences of version >= (version before the step) - bound
        assert (r["learner/version"] - 1) - r["learner/min_experience_version"] <= bound
        assert r["replay/staleness"] <= bound


def test_run_directory_contents(tiny_model, tiny_run):
    assert (tiny_run.dir / "config.yaml").is_file()
    tasks = [json.loads(line) for line in open(tiny_run.dir / "tasks" / "iter-0.jsonl")]
    assert len(tasks) == 4 and all(t["question"] and t["answer"] and "qcp" in t for t in tasks)
    # examiner-written tasks come from the final examiner (2 steps in tiny.yaml); the rest are rule-built
    assert all(t["version"] == 2 or t["flags"] == {"rule_built": True} for t in tasks)
    samples = sorted((tiny_run.dir / "samples").glob("student-step-*.jsonl"))
    assert samples
    row = json.loads(open(samples[0]).readline())
    assert len(row["tokens"]) == len(row["token_kl"]) == len(row["trajectory"]["response_ids"])
    ckpts = sorted((tiny_run.dir / "checkpoints").glob("step-*"))
    assert ckpts and ckpts[-1].name == "step-000004"
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(ckpts[-1] / "student").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[n], base[n]) for n in base)  # the checkpoint holds trained weights


def test_a_finished_run_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """The refusal reads the newest checkpoint's driver state; an unfinished one goes on to start Ray."""
    from piplay_ray.commands import train as driver
    from piplay_ray.config import load_config
    from piplay_ray.errors import UserInputError
    from piplay_ray.learner import checkpoint as ck

    def no_ray(cfg, run_dir):
        raise RuntimeError("Ray started")

    monkeypatch.setattr(driver, "init_ray", no_ray)
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"run.dir={tmp_path / 'run'}"])
    for step, phase in ((3, "student"), (4, "done")):
        with ck.atomic_dir(ck.checkpoint_dir(tmp_path / "run", step)) as d:
            ck.write_json(d / ck.DRIVER_STATE, {"phase": phase, "global_step": step})
    with pytest.raises(SystemExit, match=r"already complete \(4 steps\)"):
        driver.train(cfg)
    shutil.rmtree(ck.checkpoint_dir(tmp_path / "run", 4))  # newest is now the unfinished step 3
    with pytest.raises(RuntimeError, match="Ray started"):
        driver.train(cfg)  # writes the run's config.yaml

    # resuming with a config that trains something else is refused, naming the keys; where/how it runs may change
    def with_(*overrides):
        return load_config(str(ROOT / "configs" / "tiny.yaml"), [f"run.dir={tmp_path / 'run'}", *overrides])

    with pytest.raises(UserInputError, match=r"learner\.lr: 0\.0001 -> 0\.001.*run\.accept_changed_config=true"):
        driver.train(with_("learner.lr=0.001"))
    with pytest.raises(UserInputError, match=r"run\.seed: 0 -> 1"):  # the seed is what it trains, not where
        driver.train(with_("run.seed=1"))
    for ok in (["logging.verbose=true", "fault.learner_restarts=5"], ["learner.lr=0.001", "run.accept_changed_config=true"]):
        with pytest.raises(RuntimeError, match="Ray started"):
            driver.train(with_(*ok))


def test_dashboard_of_the_tiny_run(tiny_run, tmp_path):
    """Headless Chromium on the real run's dashboard: charts with data, the task browser with a QCP and a
    trajectory coloured by the teacher–student disagreement, actor health; a screenshot as an artifact."""
    from test_dashboard_browser import CHROMIUM, chromium, parse

    from piplay_ray.monitor.dashboard.server import start_dashboard

    if not CHROMIUM:
        pytest.skip("Debian's chromium is not installed (make browser)")
    url, stop = start_dashboard(tiny_run.dir, "127.0.0.1", 0)
    try:
        res = chromium(url, tmp_path / "profile", "--dump-dom")
        assert res.returncode == 0, res.stderr[-2000:]
        page = parse(res.stdout)
        shot = ROOT / "test-artifacts" / "dashboard-tiny-run.png"
        shot.parent.mkdir(exist_ok=True)
        chromium(url, tmp_path / "profile2", f"--screenshot={shot}")
        assert shot.is_file() and shot.stat().st_size > 10_000
    finally:
        stop()
    assert int(page.by_id("chart-rewards").attrs["data-points"]) > 0
    assert int(page.by_id("chart-loss-distill-kl").attrs["data-points"]) > 0
    detail = page.by_id("task-detail")
    assert detail.find_all("li", cls="qcp-hop"), "no QCP shown"
    toks = detail.find_all(cls="traj")[0].find_all("span", cls="tok")
    assert [t for t in toks if "data-kl" in t.attrs], "no KL-coloured tokens"
    actors = {r.attrs["data-actor"] for r in page.by_id("health").find_all("tr", data_actor=True)}
    assert {"teacher", "replay", "learner-0", "rollout-student-0", "search-0"} <= actors
