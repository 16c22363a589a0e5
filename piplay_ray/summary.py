"""The run summary: is the method at work? Computed from a run directory's files (pure, no Ray).

Read from `metrics.jsonl` (training-time rates, averaged over the logged steps) and the greedy evaluations
under `eval/` (held-out EM before and after training, with its standard error sqrt(p(1-p)/n)). The driver
writes it to `summary.json` and the console at the end; the dashboard recomputes it live.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# (key, target, what it says) — the bar a run on the embedded default should clear
TARGETS = (("answer_rate", 0.8, "student's well-formed answer rate (held-out, greedy)"),
           ("searches_per_question", 1.0, "searches per question (held-out, greedy)"),
           ("gate_pass_rate", 0.3, "examiner tasks passing the integrity gate"),
           ("examiner_written_share", 0.5, "examiner-written share of the student task set"),
           ("groups_with_signal", 0.5, "student groups with non-zero reward variance"))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _evals(run: Path) -> list[tuple[float, str, dict]]:
    out = []
    for f in (run / "eval").glob("*/metrics.json"):
        try:
            overall = json.loads(f.read_text())["summary"]["overall"]
        except (ValueError, KeyError, OSError):
            continue
        out.append((f.stat().st_mtime, f.parent.name, overall))
    return sorted(out, key=lambda e: (e[1] != "before-training", e[0]))


def compute(run_dir: str | Path) -> dict:
    """The summary of the run in `run_dir` so far (keys are None where nothing was measured yet)."""
    run = Path(run_dir)
    rows: list[dict] = []
    try:
        with open(run / "metrics.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        pass

    def series(key: str) -> list[float]:
        return [r[key] for r in rows if isinstance(r.get(key), int | float)]

    sizes, written = series("tasks/size"), series("tasks/examiner_written")
    out = {"train_answer_rate": _mean(series("student/answer_rate")),
           "train_searches_per_traj": _mean([r["rollout/searches_per_traj"] for r in rows
                                             if r.get("phase") == "student" and "rollout/searches_per_traj" in r]),
           "gate_pass_rate": _mean(series("examiner/gate_pass_rate")),
           "examiner_written_share": sum(written) / sum(sizes) if sum(sizes) else None,
           "groups_with_signal": _mean(series("student/groups_with_signal")),
           "student_reward": _mean(series("student/reward")),
           "answer_rate": None, "searches_per_question": None}
    evals = _evals(run)
    for label, ev in (("before", evals[0] if evals else None), ("after", evals[-1] if len(evals) > 1 else None)):
        if ev is None:
            continue
        _, name, m = ev
        p, n = float(m.get("em", 0.0)), int(m.get("n", 0))
        out[f"em_{label}"], out[f"em_{label}_se"], out["eval_n"] = p, math.sqrt(p * (1 - p) / n) if n else None, n
        out[f"eval_{label}"] = name
    if evals:  # behaviour of the newest evaluated student
        m = evals[-1][2]
        out["answer_rate"], out["searches_per_question"] = 1.0 - float(m.get("invalid", 1.0)), float(m.get("searches", 0))
    out["targets"] = {k: {"target": t, "value": out.get(k), "met": out.get(k) is not None and out[k] >= t,
                          "what": what} for k, t, what in TARGETS}
    if "em_after" in out:
        out["targets"]["em_gain"] = {"target": 0.0, "value": out["em_after"] - out["em_before"],
                                     "met": out["em_after"] > out["em_before"], "what": "held-out EM after - before"}
    return out


def lines(s: dict) -> list[str]:
    """The summary as console lines."""
    def f(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    out = []
    if "em_before" in s:
        after = (f", after {f(s['em_after'])} ± {f(s['em_after_se'])}" if "em_after" in s else "")
        out.append(f"held-out EM (n={s['eval_n']}): before {f(s['em_before'])} ± {f(s['em_before_se'])}{after}")
    for k, t in s["targets"].items():
        if k != "em_gain":
            out.append(f"{t['what']}: {f(t['value'])} (target ≥ {t['target']}) {'ok' if t['met'] else 'MISSED'}")
    out.append(f"student training reward {f(s['student_reward'])}, answer rate {f(s['train_answer_rate'])}, "
               f"searches per trajectory {f(s['train_searches_per_traj'])}")
    return out


def write(run_dir: str | Path) -> dict:
    """Compute and write `summary.json` atomically; returns the summary."""
    s = compute(run_dir)
    path = Path(run_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(s, indent=1))
    tmp.replace(path)
    return s
