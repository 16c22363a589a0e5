"""Integration: `piplay train` on configs/tiny.yaml with learner.lora and `teacher.backend: shared` — no teacher
actor; the student's vLLM engines score with the teacher's EMA adapter, and the checkpoint holds that adapter.

Slow (a whole tiny run, a few minutes on 2 cores): `make test-all` runs it.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.runs import metrics, train

from piplay_ray.teacher import ema

pytestmark = pytest.mark.slow


def test_tiny_lora_run_with_a_shared_teacher(tmp_path, tiny_model, corpus_path):
    run_dir = tmp_path / "lora-shared"
    proc = train(run_dir, "learner.lora.rank=4", "learner.lora.alpha=8", "teacher.backend=shared")
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = metrics(run_dir)
    learner = [r for r in rows if "learner/version" in r]
    assert [r["phase"] for r in learner] == ["examiner", "examiner", "student", "student"]
    student = [r for r in rows if "student/reward" in r]
    assert student and all("teacher/shortened_contexts" in r for r in student)  # the shared teacher scored
    kl = [r["loss/distill_kl"] for r in rows if r["phase"] == "student" and "loss/distill_kl" in r]
    assert kl and all(v == v and v >= 0 for v in kl)  # scored by the shared teacher, finite
    health = json.loads((run_dir / "health.json").read_text())
    assert "teacher" not in health["actors"] and "rollout-student-0" in health["actors"]  # no teacher actor
    # the final checkpoint holds the EMA adapter at the student's version, and it moved off the zero start
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    version, tensors = ema.read_ema(last / "teacher")
    assert version == 2 and tensors and all(".lora_A." in n or ".lora_B." in n for n, _ in tensors)
    assert any(torch.count_nonzero(t) for n, t in tensors if ".lora_B." in n)
