"""A toy arm and a toy reward added through their registries train the tiny config one student step: the
teacher actor (another process) resolves the arm, the step recipe the reward (docs/architecture.md)."""

from __future__ import annotations

import pytest
from helpers.plugins import TOY_ARM, TOY_REWARD, toy_reward
from helpers.runs import ROOT, metrics

from piplay_ray.commands.train import train
from piplay_ray.config import ConfigError, load_config
from piplay_ray.method import privileged
from piplay_ray.registry import ARMS, REWARDS

ARM, REWARD = "helpers.plugins:TOY_ARM", "helpers.plugins:toy_reward"


def test_a_toy_arm_and_reward_through_the_registries(tmp_path):
    assert privileged.arm(ARM) is TOY_ARM and REWARDS.load(REWARD) is toy_reward
    with pytest.raises(ConfigError, match="teacher.privileged"):
        load_config(None, ["teacher.privileged=helpers.plugins:NO_SUCH_ARM"])
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      [f"run.dir={tmp_path / 'run'}", f"teacher.privileged={ARM}", f"student.reward={REWARD}",
                       "schedule.examiner_steps=0", "schedule.student_steps=1", "checkpoint.every=0"])
    train(cfg)
    rows = metrics(tmp_path / "run")
    (step,) = [r for r in rows if "student/reward" in r]
    assert step["student/reward"] == pytest.approx(TOY_REWARD) and step["student/em"] != pytest.approx(TOY_REWARD)
    # the teacher actor scored every response with the toy arm's context, and the learner distilled from it
    assert step["teacher/unscored"] == 0
    (learned,) = [r for r in rows if "loss/distill_kl" in r]
    assert learned["phase"] == "student" and learned["loss/distill_kl"] > 0


def test_a_registered_name_is_a_config_value():
    ARMS.register("toy_hint", ARM)
    try:
        assert load_config(None, ["teacher.privileged=toy_hint"]).teacher.privileged == "toy_hint"
        assert privileged.render(_task(), "toy_hint") == TOY_ARM.text(_task(), None, None, 0)
    finally:
        ARMS._entries.pop("toy_hint")


def _task():
    from piplay_ray.records import Doc, Task

    return Task(id="t", question="Who?", answer="Ada Lovelace", hops=1, source=Doc("d", "T", "text"), qcp=[])
