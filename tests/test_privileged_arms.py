"""The paper's ablation arms end to end: `piplay train` on configs/tiny.yaml with each other value of
`teacher.privileged` (the default `qcp` is test_train_tiny's run), one examiner and one student step each.

`none` must train without any teacher fields (no distillation term, λ logged as 0); the others must score
the student's tokens with the teacher (distillation logged).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arm", ["partial_qcp", "answer", "none"])
def test_arm_runs_end_to_end(arm, tmp_path, tiny_model, corpus_path):
    run_dir = tmp_path / arm
    cmd = [sys.executable, "-m", "piplay_ray", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"run.dir={run_dir}", f"teacher.privileged={arm}", "schedule.examiner_steps=1",
           "schedule.student_steps=1", "checkpoint.every=0", "rollout.engine=transformers",
           "logging.tensorboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    (student,) = [r for r in rows if r["phase"] == "student" and "learner/version" in r]
    (diag,) = [r for r in rows if r["phase"] == "student" and "student/reward" in r]
    assert "diag/answer_before_search" in diag
    if arm == "none":
        assert student["schedule/lambda"] == 0.0 and "loss/distill_kl" not in student
        assert "diag/kl_reasoning" not in diag and "teacher/shortened_contexts" not in diag
    else:
        assert student["schedule/lambda"] > 0 and "loss/distill_kl" in student
        assert diag["teacher/unscored"] == 0 and "diag/teacher_top1_agreement" in diag
    if arm == "answer":  # the answer itself is the privileged text: never in the question (gate)
        assert diag["diag/answer_only_in_teacher"] > 0
