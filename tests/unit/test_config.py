"""Config loading: composition, overrides, interpolation and errors that name the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.runs import ROOT

from piplay_ray.cli import main
from piplay_ray.config import ConfigError, load_config, validate

CONFIGS = ROOT / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if "experiments" not in p.parts)  # specs: test_experiment


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert validate(cfg.model_dump(mode="json")) == cfg  # what a run writes to config.yaml loads back the same


def test_shipped_configs_include_the_required_ones():
    names = {str(p.relative_to(CONFIGS)) for p in SHIPPED}
    assert {"local.yaml", "tiny.yaml", "cluster/qwen3-4b.yaml"} <= names


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_misspelled_key_names_the_dotted_key(tmp_path):
    p = _write(tmp_path, "c.yaml", "student:\n  group_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "`student.group_sise`" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_names_key_and_value(tmp_path):
    p = _write(tmp_path, "c.yaml", "learner:\n  lr: fast\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "`learner.lr`" in str(e.value) and "'fast'" in str(e.value)


def test_out_of_range_value_names_key_and_bound(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["teacher.ema_tau=1.5"])
    msg = str(e.value)
    assert "`teacher.ema_tau`" in msg and "1.5" in msg and "less than or equal to 1" in msg


def test_literal_error_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["learner.zero_stage=4"])
    assert "`learner.zero_stage`" in str(e.value) and "0, 1, 2 or 3" in str(e.value)


def test_nested_key_in_list_section_is_named():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["schedule.distill_lambda=[0.1,-1]"])
    assert "`schedule.distill_lambda.1`" in str(e.value)


def test_overrides_beat_file_values(tmp_path):
    p = _write(tmp_path, "c.yaml", "student:\n  group_size: 4\n")
    assert load_config(p).student.group_size == 4
    assert load_config(p, ["student.group_size=8"]).student.group_size == 8


def test_extends_merges_child_over_base(tmp_path):
    _write(tmp_path, "base.yaml", "student:\n  group_size: 4\n  max_turns: 7\nlearner:\n  lr: 0.5\n")
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\nstudent:\n  group_size: 6\n")
    cfg = load_config(child)
    assert (cfg.student.group_size, cfg.student.max_turns, cfg.learner.lr) == (6, 7, 0.5)


def test_extends_cycle_is_an_error(tmp_path):
    _write(tmp_path, "a.yaml", "extends: b.yaml\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_interpolation_resolves(tmp_path):
    p = _write(tmp_path, "c.yaml", "student:\n  group_size: 6\nexaminer:\n  attempts: ${student.group_size}\n")
    assert load_config(p).examiner.attempts == 6


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["student.group_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_lambda_schedule_holds_last_value():
    s = load_config(None, ["schedule.distill_lambda=[0.03,0.003,0.002]"]).schedule
    assert [s.lam(i) for i in range(5)] == [0.03, 0.003, 0.002, 0.002, 0.002]


def test_paper_schedule_in_cluster_config():
    cfg = load_config(CONFIGS / "cluster" / "qwen3-4b.yaml")
    s = cfg.schedule
    assert (s.iterations, s.examiner_steps, s.student_steps) == (3, 50, 50)
    assert s.distill_lambda == [0.03, 0.003, 0.002]
    assert cfg.teacher.ema_tau == 0.05 and cfg.examiner.hop_weights == [4, 3, 2, 1] and cfg.student.group_size == 5


def test_cli_config_show(capsys):
    assert main(["config", "show", "--config", str(CONFIGS / "tiny.yaml"), "student.group_size=3"]) == 0
    out = capsys.readouterr().out
    assert "group_size: 3" in out and "base: builtin:tiny" in out
    assert main(["config", "show", "--config", str(CONFIGS / "tiny.yaml"), "student.nope=1"]) == 2
    assert "`student.nope`" in capsys.readouterr().err


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "a list"), ("42\n", "a single int value (42)"),
                                       ("hello\n", "a single str value ('hello')")])
def test_a_file_that_is_not_a_mapping_is_named(tmp_path, capsys, text, kind):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="must be a mapping of sections") as e:
        load_config(p)
    assert str(e.value).endswith(f"it holds {kind}")
    assert main(["config", "show", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"piplay: {p}: a config file must be a mapping") and "Traceback" not in err


@pytest.mark.parametrize("override", ["x=[1,2", "run.name={a", "schedule.distill_lambda=[0.1, 0.2", "run.name=]"])
def test_unparsable_override_is_named(capsys, override):
    with pytest.raises(ConfigError, match="cannot parse the value") as e:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert f"override `{override}`" in str(e.value)
    assert main(["config", "show", "--config", str(CONFIGS / "tiny.yaml"), override]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_mapping_override_is_validated_like_a_file():
    with pytest.raises(ConfigError, match="`x`: unknown key"):
        load_config(CONFIGS / "tiny.yaml", ["x={a: 1}"])
    with pytest.raises(ConfigError, match="`run.name`: got {'a': 1}"):
        load_config(CONFIGS / "tiny.yaml", ["run.name={a: 1}"])
    assert load_config(CONFIGS / "tiny.yaml", ["run={name: z}"]).run.name == "z"


@pytest.mark.parametrize("overrides,message", [
    (["replay.capacity_groups=1", "student.tasks_per_step=8"],
     "replay.capacity_groups=1 is smaller than the 8 groups one student step needs"),
    (["rollout.max_tokens_per_turn=200"], "rollout.max_tokens_per_turn=200 exceeds rollout.max_response_tokens=128"),
    (["rollout.max_response_tokens=1024"], "rollout.max_response_tokens=1024 leaves no room for the prompt"),
])
def test_cross_field_conflicts_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", overrides)
    assert message in str(e.value) and "{'run'" not in str(e.value)  # the message, not the whole config
    load_config(CONFIGS / "tiny.yaml", ["replay.capacity_groups=8", "student.tasks_per_step=8"])


def test_the_task_set_is_what_a_student_phase_trains():
    """Every task trained once a phase unless student.task_uses says otherwise; a given size that differs is
    refused, naming the keys (before: a cluster config wrote 2,048 tasks and trained each ~6 times)."""
    tiny = load_config(CONFIGS / "tiny.yaml", ["schedule.student_steps=5", "student.tasks_per_step=3"])
    assert tiny.task_set_size == 15
    assert load_config(CONFIGS / "tiny.yaml", ["schedule.student_steps=5", "student.tasks_per_step=3",
                                               "student.task_uses=2"]).task_set_size == 8  # ceil(15 / 2)
    assert load_config(CONFIGS / "tiny.yaml", ["schedule.student_steps=0"]).task_set_size == 2  # one step's worth
    assert load_config(CONFIGS / "tiny.yaml", ["examiner.task_set_size=4"]).task_set_size == 4  # 2 x 2 agrees
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", ["examiner.task_set_size=2048"])
    for key in ("examiner.task_set_size=2048", "schedule.student_steps=2", "student.tasks_per_step=2",
                "student.task_uses=1"):
        assert key in str(e.value)
    for path in sorted((CONFIGS / "cluster").glob("qwen3-*.yaml")):  # the paper's scale: 50 x 256, once each
        cfg = load_config(path)
        assert cfg.task_set_size == cfg.schedule.student_steps * cfg.student.tasks_per_step, path.name


def test_a_turn_without_its_own_cap_may_use_the_whole_response():
    cfg = load_config(CONFIGS / "tiny.yaml", ["rollout.max_tokens_per_turn=null"])
    assert cfg.rollout.turn_tokens == cfg.rollout.max_response_tokens == 128
    assert load_config(CONFIGS / "tiny.yaml").rollout.turn_tokens == 24
    assert load_config(CONFIGS / "cluster" / "qwen3-4b.yaml").rollout.turn_tokens == 2560  # Dr. Zero's total


def test_the_instruct_variant_is_qwen3_4b_with_the_instruct_lambda_schedule():
    """configs/cluster/variants/qwen3-4b-instruct.yaml: the paper's 4B-Instruct λ (0.1 -> 0.03 -> 0.03); all else
    is qwen3-4b.yaml's, so the qwen3-4b cluster and manifests run it."""
    variant = load_config(CONFIGS / "cluster" / "variants" / "qwen3-4b-instruct.yaml")
    base = load_config(CONFIGS / "cluster" / "qwen3-4b.yaml")
    assert [variant.schedule.lam(i) for i in range(4)] == [0.1, 0.03, 0.03, 0.03]
    assert variant.model.base == "Qwen/Qwen3-4B-Instruct-2507" and variant.learner.optimizer_restart == "iteration"
    a, b = variant.model_dump(), base.model_dump()
    for section, changed in {"run": {"name"}, "model": {"base"}, "schedule": {"distill_lambda"}}.items():
        a[section] = {k: v for k, v in a[section].items() if k not in changed}
        b[section] = {k: v for k, v in b[section].items() if k not in changed}
    assert a == b
