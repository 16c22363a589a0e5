"""The metrics sink: metrics.jsonl lines per the run-directory contract, TensorBoard scalars and histograms,
W&B (a stand-in module records the calls; the real client is optional), Ray gauges scraped from Ray's own
Prometheus endpoint, and the atomic health/sample files."""

from __future__ import annotations

import json
import math
import sys
import time
import types
import urllib.request

import numpy as np
import pytest
import torch

from piplay_ray.config import LoggingConfig
from piplay_ray.monitor.metrics import MetricsSink, clean_metrics, gauge_name
from piplay_ray.records import Doc, Hop, Task, Trajectory, to_dict


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_lines_follow_the_contract(tmp_path):
    before = time.time()
    with MetricsSink(tmp_path, LoggingConfig(tensorboard=False)) as sink:
        sink.log({"student/reward": 0.5, "student/em": np.float32(0.25), "loss/entropy": torch.tensor(1.5),
                  "replay/staleness": np.int64(2), "examiner/solve_rate_hist": [0.0, 0.25, 1.0],
                  "learner/idle_frac": float("nan"), "search/tool_failures": True, "skipped": None},
                 iteration=1, phase="student", step=7)
        sink.log({"examiner/solve_rate_hist": np.array([0.5, 0.75])}, iteration=2, phase="examiner", step=8)
        # each line is on disk as soon as it is logged (the dashboard polls the file)
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    first = rows[0]
    assert before - 0.001 <= first["time"] <= time.time() + 1  # times are rounded to the millisecond
    assert (first["iteration"], first["phase"], first["step"]) == (1, "student", 7)
    assert first["student/reward"] == 0.5 and first["student/em"] == 0.25 and first["loss/entropy"] == 1.5
    assert first["replay/staleness"] == 2 and first["search/tool_failures"] == 1
    assert first["examiner/solve_rate_hist"] == [0.0, 0.25, 1.0]
    assert first["learner/idle_frac"] is None  # NaN is not JSON: written as null
    assert "skipped" not in first
    assert rows[1] == {**rows[1], "iteration": 2, "phase": "examiner", "step": 8,
                       "examiner/solve_rate_hist": [0.5, 0.75]}


def test_appends_to_an_existing_run(tmp_path):
    for step in (1, 2):
        with MetricsSink(tmp_path, LoggingConfig(tensorboard=False)) as sink:
            sink.log({"student/em": step / 10}, iteration=0, phase="student", step=step)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_bad_input_is_a_clear_error(tmp_path):
    sink = MetricsSink(tmp_path, LoggingConfig(tensorboard=False))
    with pytest.raises(ValueError, match="phase"):
        sink.log({"a": 1.0}, iteration=0, phase="training", step=0)
    with pytest.raises(TypeError, match="'student/answer'"):
        sink.log({"student/answer": "Paris"}, iteration=0, phase="student", step=0)
    with pytest.raises(ValueError, match="reserved"):
        sink.log({"step": 3}, iteration=0, phase="student", step=0)
    with pytest.raises(ValueError, match="non-negative"):
        sink.log({"a": 1.0}, iteration=-1, phase="student", step=0)
    sink.close()
    with pytest.raises(RuntimeError, match="close"):
        sink.log({"a": 1.0}, iteration=0, phase="student", step=0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # nothing half-written


def test_clean_metrics_and_gauge_names():
    assert clean_metrics({"x": np.float64(2.5), "h": (1, 0.5)}) == {"x": 2.5, "h": [1, 0.5]}
    nonfinite = {"nan": float("nan"), "inf": float("inf"), "ninf": -math.inf, "np_nan": np.float32("nan"),
                 "h": [1.0, float("nan")], "ok": 0.5}
    assert clean_metrics(nonfinite) == {"nan": None, "inf": None, "ninf": None, "np_nan": None, "h": [1.0, None],
                                        "ok": 0.5}
    assert gauge_name("throughput/rollout_tokens_per_s") == "piplay_throughput_rollout_tokens_per_s"
    assert gauge_name("weight_sync/seconds.p50") == "piplay_weight_sync_seconds_p50"


def test_tensorboard_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsSink(tmp_path, LoggingConfig()) as sink:
        for step, em in [(1, 0.1), (2, 0.3), (3, 0.6)]:
            sink.log({"student/em": em, "examiner/solve_rate_hist": [0.0, em, 1.0]},
                     iteration=0, phase="student", step=step)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    events = acc.Scalars("student/em")
    assert [e.step for e in events] == [1, 2, 3]
    assert [round(e.value, 6) for e in events] == [0.1, 0.3, 0.6]
    hist = acc.Histograms("examiner/solve_rate_hist")
    assert [h.step for h in hist] == [1, 2, 3]
    assert hist[-1].histogram_value.num == 3 and hist[-1].histogram_value.sum == pytest.approx(1.6)


def test_wandb_offline_when_installed(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data):
            calls["log"].append(data)

        def finish(self):
            calls["finish"] += 1

    def init(**kw):
        calls["init"].append(kw)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = LoggingConfig(tensorboard=False, wandb=True, wandb_project="proj")
    with MetricsSink(tmp_path, cfg, config={"seed": 3}, run_name="r1") as sink:
        sink.log({"student/em": 0.5, "examiner/solve_rate_hist": [0.5]}, iteration=2, phase="student", step=9)
    (kw,) = calls["init"]
    assert kw["mode"] == "offline" and kw["project"] == "proj" and kw["name"] == "r1"
    assert kw["dir"] == str(tmp_path) and kw["config"] == {"seed": 3}
    assert calls["log"] == [{"student/em": 0.5, "iteration": 2, "global_step": 9}]
    assert calls["finish"] == 1


def test_wandb_missing_is_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with MetricsSink(tmp_path, LoggingConfig(tensorboard=False, wandb=True)) as sink:
        sink.log({"student/em": 0.5}, iteration=0, phase="student", step=1)
    assert "wandb is not installed" in caplog.text
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["student/em"] == 0.5


def test_health_and_samples_files(tmp_path):
    sink = MetricsSink(tmp_path, LoggingConfig(tensorboard=False))
    sink.write_health({"teacher": {"alive": False, "restarts": 2, "last_error": ValueError("boom")},
                       "learner": {"alive": True}})
    health = json.loads((tmp_path / "health.json").read_text())
    assert health["actors"] == {"teacher": {"alive": False, "restarts": 2, "last_error": "boom"},
                                "learner": {"alive": True, "restarts": 0, "last_error": None}}
    assert abs(health["updated"] - time.time()) < 60
    task = Task(id="t1", question="q?", answer="a", hops=1, source=Doc("d", "T", "text"),
                qcp=[Hop("query", [Doc("d", "T", "text")])])
    traj = Trajectory(prompt_ids=[1], response_ids=[5, 6], mask=[1, 0], logprobs=[-0.1, 0.0], answer="a")
    path = sink.write_samples("student", 12, [{"task": task, "trajectory": traj, "reward": 1.0,
                                              "tokens": ["a", "b"], "token_kl": [0.25, None]}])
    sink.close()
    assert path == tmp_path / "samples" / "student-step-000012.jsonl"
    (rec,) = read_jsonl(path)
    assert rec["task"] == to_dict(task) and rec["trajectory"] == to_dict(traj)
    assert rec["tokens"] == ["a", "b"] and rec["token_kl"] == [0.25, None] and rec["reward"] == 1.0
    assert Task.from_dict(rec["task"]) == task  # round-trips into the record types
    assert not list((tmp_path / "samples").glob(".*tmp"))
    with pytest.raises(ValueError, match="role"):
        sink.write_samples("teacher", 1, [])


RAY_CPUS = 1


def test_throughput_gauges_reach_ray_prometheus(tmp_path, ray_local):
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    sink = MetricsSink(tmp_path, LoggingConfig(tensorboard=False), run_name="gauge-run")
    want = 'ray_piplay_throughput_rollout_tokens_per_s{'
    found = None
    deadline = time.time() + 45
    while time.time() < deadline and found is None:
        sink.log({"throughput/rollout_tokens_per_s": 123.5, "student/em": 0.5},
                 iteration=0, phase="student", step=1)
        time.sleep(1.5)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        found = next((line for line in text.splitlines() if line.startswith(want)), None)
    sink.close()
    assert found is not None, "gauge never appeared on Ray's Prometheus endpoint"
    assert 'run="gauge-run"' in found and 'phase="student"' in found and found.endswith(" 123.5")
    assert "piplay_student_em" not in text  # only system metrics become gauges
