"""The experiment report over hand-written metrics files: points, the table's figures by hand, the plot."""

from __future__ import annotations

import json

import pytest

from piplay_ray.monitor import report as R


def _metrics(path, ems: dict[int, float]) -> str:
    rows = [{"phase": "student", "step": 1, "student/reward": 0.5}]
    rows += [{"phase": "eval", "student_step": s, "eval/overall/em": em, "eval/overall/f1": em + 0.1,
              "eval/overall/n": 100} for s, em in ems.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def points(tmp_path):
    curves = {("qcp", 0): {0: 0.40, 2: 0.46, 4: 0.50}, ("qcp", 1): {0: 0.40, 2: 0.44, 4: 0.52},
              ("none", 0): {0: 0.40, 2: 0.42, 4: 0.45}, ("none", 1): {0: 0.40, 2: 0.41, 4: 0.43}}
    out = []
    for (arm, seed), ems in curves.items():
        out += R.curve(_metrics(tmp_path / f"{arm}{seed}.jsonl", ems), arm, seed)
    return out


def test_a_redone_step_keeps_its_last_evaluation(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"student_step": 2, "eval/overall/em": 0.1}) + "\n"
                    + json.dumps({"student_step": 2, "eval/overall/em": 0.3}) + "\n")
    assert [(p["student_step"], p["em"]) for p in R.curve(path, "a", 0)] == [(2, 0.3)]


def test_summary_by_hand(points):
    rows = {r["arm"]: r for r in R.summary(points, baseline="none")}
    # qcp final: 0.50, 0.52 -> mean 0.51, sample sd sqrt(((0.01)^2 * 2) / 1) = 0.01414
    assert rows["qcp"]["final_em"] == pytest.approx(0.51)
    assert rows["qcp"]["spread"] == pytest.approx(0.0141421, rel=1e-4)
    # the baseline's final mean is 0.44; qcp's mean at step 2 is 0.45 >= 0.44, at step 0 it is 0.40
    assert rows["qcp"]["steps_to_baseline"] == 2 and rows["none"]["steps_to_baseline"] == 4
    assert rows["none"]["final_em"] == pytest.approx(0.44) and rows["qcp"]["seeds"] == 2 and rows["qcp"]["n"] == 100
    with pytest.raises(ValueError, match="baseline arm 'answer'"):
        R.summary(points, baseline="answer")


def test_outputs(points, tmp_path):
    paths = R.write(points, "none", tmp_path, header="# ablation\n\n")
    saved = json.loads(paths["json"].read_text())
    assert len(saved["points"]) == 12 and {p["arm"] for p in saved["points"]} == {"qcp", "none"}
    md = paths["md"].read_text()
    assert md.startswith("# ablation") and "| qcp | 0.510 ± 0.014 | 2 | 100 | 2 | — |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_seed = [p for p in points if p["seed"] == 0]
    assert "| qcp | 0.500 | 1 | 100 | 2 | — |" in R.markdown(R.summary(one_seed, "none"), "none")


def test_paired_differences_by_hand(points, tmp_path):
    """Same questions, same seed: the difference per question; mean and standard error over the pairs."""
    def examples(name, ems):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": q, "em": em}) + "\n" for q, em in ems.items()))
        return R.answers(path)

    finals = {("qcp", 0): examples("q0", {"a": 1, "b": 1, "c": 0}), ("none", 0): examples("n0", {"a": 0, "b": 1, "c": 0}),
              ("qcp", 1): examples("q1", {"a": 1, "b": 0, "c": 1}), ("none", 1): examples("n1", {"a": 1, "b": 0, "c": 0})}
    d = R.paired(finals, "none")
    # qcp - none per (seed, question): seed 0: 1, 0, 0; seed 1: 0, 0, 1 -> mean 1/3, sd sqrt(4/15), n 6
    assert d["qcp"]["pairs"] == 6 and d["qcp"]["delta"] == pytest.approx(1 / 3)
    assert d["qcp"]["se"] == pytest.approx((4 / 15) ** 0.5 / 6 ** 0.5)
    assert d["none"] == {"delta": 0.0, "se": 0.0, "pairs": 6}
    md = R.markdown(R.summary(points, "none", d), "none")
    assert "| qcp | 0.510 ± 0.014 | 2 | 100 | 2 | +0.333 ± 0.211 (6 pairs) |" in md and "| none | 0.440 ± 0.014 | 2 | 100 | 4 | — |" in md
