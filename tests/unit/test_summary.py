"""The run summary (summary.py) on run directories written by hand, against values worked out by hand:
means over the logged steps, examiner-written share = sum written / sum size, EM SE = sqrt(p(1-p)/n)."""

from __future__ import annotations

import json
import os

import pytest

from piplay_ray.monitor import summary


def write_eval(run, name, em, n=16, invalid=0.25, searches=0.5, mtime=None):
    d = run / "eval" / name
    d.mkdir(parents=True)
    f = d / "metrics.json"
    f.write_text(json.dumps({"summary": {"nq": {"em": 0.0, "n": 1},
                                         "overall": {"em": em, "n": n, "invalid": invalid, "searches": searches}}}))
    if mtime is not None:
        os.utime(f, (mtime, mtime))


def write_metrics(run, rows, tail=""):
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


ROWS = [
    {"step": 1, "phase": "examiner", "examiner/gate_pass_rate": 0.25, "examiner/attempts": 4,
     "rollout/searches_per_traj": 4.0, "examiner/gate_fail/answer_supported": 0.75, "examiner/gate_fail/has_answer": 0.0},
    {"step": 2, "phase": "examiner", "examiner/gate_pass_rate": 0.5, "examiner/attempts": 4,
     "rollout/searches_per_traj": 4.0, "examiner/gate_fail/answer_supported": 0.25, "examiner/gate_fail/has_answer": 0.0,
     "examiner/gate_fail/well_formed": 0.5},
    {"step": 2, "phase": "examiner", "examiner/gate_pass_rate": None, "examiner/attempts": 4},  # NaN, as written
    {"step": 2, "phase": "examiner", "tasks/examiner_pass_rate": 0.75, "tasks/examiner_attempts": 8},
    {"step": 2, "phase": "examiner", "tasks/size": 10, "tasks/examiner_written": 1},
    {"step": 3, "phase": "student", "student/answer_rate": 0.5, "student/groups_with_signal": 0.25,
     "student/reward": 0.125, "rollout/searches_per_traj": 1.0},
    {"step": 4, "phase": "student", "student/answer_rate": 1.0, "student/groups_with_signal": 0.5,
     "student/reward": 0.375, "rollout/searches_per_traj": 2.0},
    {"step": 5, "phase": "student", "rollout/searches_per_traj": None},
    {"step": 5, "phase": "examiner", "tasks/size": 6, "tasks/examiner_written": 6},
]


def test_summary_of_a_run(tmp_path):
    write_metrics(tmp_path, ROWS[:4] + ["not json"] + ROWS[4:], tail='{"step": 6, "student/answer_rate": 0')
    write_eval(tmp_path, "before-training", 0.25, mtime=3000)
    write_eval(tmp_path, "iter-2", 0.375, mtime=1000)
    # the newest evaluation is iter-10 (by number, whatever the file times say)
    write_eval(tmp_path, "iter-10", 0.5625, invalid=0.125, searches=1.5, mtime=2000)
    s = summary.compute(tmp_path)
    # every attempt counts once: 1 of 4 and 2 of 4 in the steps, 6 of 8 writing the task set; the null row skipped
    assert s["gate_pass_rate"] == pytest.approx(9 / 16) and s["gate_pass_n"] == 16
    assert s["examiner_written_share"] == pytest.approx(7 / 16)  # (1 + 6) / (10 + 6), not the mean of ratios
    assert s["train_answer_rate"] == pytest.approx(0.75)  # the half-written last line is skipped
    assert s["groups_with_signal"] == pytest.approx(0.375)
    assert s["student_reward"] == pytest.approx(0.25)
    assert s["train_searches_per_traj"] == pytest.approx(1.5)  # student steps only
    assert s["em_before"] == 0.25 and s["em_after"] == 0.5625 and s["eval_n"] == 16
    assert s["em_before_se"] == pytest.approx(0.10825317547305482)  # sqrt(0.25 * 0.75 / 16)
    assert s["em_after_se"] == pytest.approx(0.12401959270615269)  # sqrt(0.5625 * 0.4375 / 16)
    assert (s["eval_before"], s["eval_after"]) == ("before-training", "iter-10")
    assert s["answer_rate"] == pytest.approx(0.875) and s["searches_per_question"] == pytest.approx(1.5)
    t = s["targets"]
    assert {k: v["met"] for k, v in t.items()} == {
        "answer_rate": True, "searches_per_question": True, "gate_pass_rate": True,
        "examiner_written_share": False, "groups_with_signal": False, "em_gain": True}
    assert t["em_gain"]["value"] == pytest.approx(0.3125) and t["answer_rate"]["target"] == 0.8
    text = "\n".join(summary.lines(s))
    assert "before 0.250 ± 0.108, after 0.562 ± 0.124" in text and "n=16" in text
    assert "(target ≥ 0.5) MISSED" in text
    assert s["gate_failures"] == {"answer_supported": 0.5, "has_answer": 0.0, "well_formed": 0.5}
    assert "failing each gate check: well_formed 0.50, answer_supported 0.50\n" in text + "\n"  # zeros left out
    written = summary.write(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == written == s


def test_summary_before_anything_was_measured(tmp_path):
    s = summary.compute(tmp_path)
    assert s["gate_pass_rate"] is None and s["examiner_written_share"] is None and s["answer_rate"] is None
    assert "em_before" not in s and "em_after" not in s and "em_gain" not in s["targets"]
    assert all(t["value"] is None and t["met"] is False for t in s["targets"].values())
    assert len(summary.lines(s)) == len(s["targets"]) + 1


def test_summary_evaluations_in_progress(tmp_path):
    write_eval(tmp_path, "before-training", 0.5, n=4)
    s = summary.compute(tmp_path)
    assert s["em_before"] == 0.5 and s["em_before_se"] == pytest.approx(0.25)  # sqrt(0.25 / 4)
    assert "em_after" not in s and "em_gain" not in s["targets"]
    assert s["answer_rate"] == pytest.approx(0.75)  # the newest evaluated student: 1 - invalid
    # a run without a before-training evaluation: an iteration's evaluation is "after", never "before"
    other = tmp_path / "other"
    write_eval(other, "iter-0", 0.75, n=0)
    (other / "eval" / "broken").mkdir()
    (other / "eval" / "broken" / "metrics.json").write_text('{"summary": ')
    s = summary.compute(other)
    assert "em_before" not in s and s["em_after"] == 0.75 and s["em_after_se"] is None
    assert "after 0.750 ± n/a" in summary.lines(s)[0]


def write_examples(run, name, ems: dict[str, dict[str, float]]):
    """eval/NAME with per-example records {source: {id: em}} and the summary those records give."""
    from piplay_ray.method.scores import summarize

    records = [{"id": i, "data_source": src, "kind": "single", "prediction": "x", "em": em, "f1": em, "searches": 1,
                "turns": 2, "answer_words": 1, "invalid": 0.0} for src, rows in ems.items() for i, em in rows.items()]
    d = run / "eval" / name
    d.mkdir(parents=True)
    (d / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "metrics.json").write_text(json.dumps({"summary": summarize(records)}))


def test_the_natural_set_is_the_headline_paired_by_question(tmp_path):
    write_examples(tmp_path, "before-training", {"natural": {"n1": 0, "n2": 1, "n3": 0, "n4": 1},
                                                  "rule": {"r1": 1, "r2": 0}})
    write_examples(tmp_path, "iter-0", {"natural": {"n1": 1, "n2": 1, "n3": 1, "n4": 0},
                                         "rule": {"r1": 1, "r2": 1}})
    s = summary.compute(tmp_path)
    assert s["eval_set"] == "natural" and (s["em_before"], s["em_after"], s["eval_n"]) == (0.5, 0.75, 4)
    assert s["em_before_se"] == pytest.approx(0.25)  # sqrt(.5 * .5 / 4)
    # natural diffs +1, 0, +1, -1: mean .25, sample var (.5625+.0625+.5625+1.5625)/3 = 11/12, se sqrt(11/12/4)
    assert s["em_change"] == pytest.approx({"n": 4, "before": 0.5, "after": 0.75, "delta": 0.25,
                                            "se": (11 / 48) ** 0.5, "gained": 2, "lost": 1})
    rule = s["eval_sets"]["rule"]
    assert (rule["before"]["em"], rule["after"]["em"], rule["change"]["gained"]) == (0.5, 1.0, 1)
    assert list(s["eval_sets"]) == ["natural", "rule"]  # overall mixes the two sets: not reported
    text = summary.lines(s)
    assert text[0] == "natural-question EM (the headline) (n=4): before 0.500 ± 0.250, after 0.750 ± 0.217"
    assert text[1] == "  paired by question: +0.250 ± 0.479, 2 gained, 1 lost (n=4)"
    assert text[2].startswith("rule-built EM (the protocol check) (n=2): before 0.500 ± 0.354, after 1.000 ± 0.000")


def test_piplay_curve_tables_and_plots_every_evaluation(tmp_path, capsys):
    from piplay_ray.cli import main

    run = tmp_path / "run"
    for name, step, ems in (("before-training", 0, [0, 1, 0, 0]), ("iter-0", 6, [1, 1, 0, 0]),
                            ("iter-1", 12, [1, 1, 1, 0])):
        write_examples(run, name, {"natural": dict(zip("abcd", ems, strict=True)), "rule": {"r": 1}})
        meta = json.loads((run / "eval" / name / "metrics.json").read_text()) | {"student_step": step}
        (run / "eval" / name / "metrics.json").write_text(json.dumps(meta))
    assert main(["curve", str(run), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "curve.md").read_text().splitlines()
    assert table[0] == "| evaluation | student step | natural EM ± SE (n) | rule EM ± SE (n) |"
    # EM .25, .5, .75 of 4: SE sqrt(p(1-p)/4)
    assert table[2:] == ["| before-training | 0 | 0.250 ± 0.217 (4) | 1.000 ± 0.000 (1) |",
                         "| iter-0 | 6 | 0.500 ± 0.250 (4) | 1.000 ± 0.000 (1) |",
                         "| iter-1 | 12 | 0.750 ± 0.217 (4) | 1.000 ± 0.000 (1) |"]
    assert (tmp_path / "out" / "curve.png").stat().st_size > 1000 and "iter-1 | 12" in capsys.readouterr().out
    assert main(["curve", str(tmp_path / "nothing")]) == 2
    assert "no evaluation under eval/" in capsys.readouterr().err
