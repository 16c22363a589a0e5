"""The run summary: is the method at work? Computed from a run directory's files (pure, no Ray).

Read from `metrics.jsonl` (training-time rates, averaged over the logged steps; the gate pass rate pooled
over every examiner attempt: its training steps and the attempts that wrote the task sets) and the greedy
evaluations under `eval/` (`heldout`: each set's EM before and after training, with its standard error
sqrt(p(1-p)/n) and the change paired by question; the natural-question set is the headline).
The driver writes it to `summary.json` and the console at the end; the dashboard recomputes it live.
"""

from __future__ import annotations

import json
from pathlib import Path

from piplay_ray.monitor import heldout
from piplay_ray.monitor.heldout import finite, read_jsonl, within
from piplay_ray.records import NATURAL_SOURCE, RULE_SOURCE
from piplay_ray.rundir import METRICS, SUMMARY, write_atomic

# (key, target, what it says) — the bar a run on the embedded default should clear
TARGETS = (("answer_rate", 0.8, "student's well-formed answer rate (held-out, greedy)"),
           ("searches_per_question", 1.0, "searches per question (held-out, greedy)"),
           ("gate_pass_rate", 0.3, "examiner tasks passing the integrity gate (all attempts)"),
           ("examiner_written_share", 0.5, "examiner-written share of the student task set"),
           ("groups_with_signal", 0.5, "student groups with non-zero reward variance"))


# how the console names each held-out set's EM
SET_NAMES = {NATURAL_SOURCE: "natural-question EM (the headline)", RULE_SOURCE: "rule-built EM (the protocol check)",
             heldout.OVERALL: "held-out EM"}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def compute(run_dir: str | Path) -> dict:
    """The summary of the run in `run_dir` so far (keys are None where nothing was measured yet).

    Files that resolve outside the run directory (symlinked out of it) are not read.
    """
    run = Path(run_dir).resolve()
    rows = read_jsonl(run / METRICS) if within(run, run / METRICS) else []

    def series(key: str, phase: str | None = None) -> list[float]:
        return [r[key] for r in rows if finite(r.get(key)) and (phase is None or r.get("phase") == phase)]

    def pooled(*pairs: tuple[str, str]) -> tuple[float | None, int]:
        """Σ rate·n / Σ n over the rows that log a (rate, attempts) pair: a rate over every attempt."""
        got = [(r[rate], r[n]) for r in rows for rate, n in pairs if finite(r.get(rate)) and finite(r.get(n))]
        total = sum(n for _, n in got)
        return (sum(p * n for p, n in got) / total if total else None), int(total)

    sizes, written = series("tasks/size"), series("tasks/examiner_written")
    gate, gate_n = pooled(("examiner/gate_pass_rate", "examiner/attempts"),
                          ("tasks/examiner_pass_rate", "tasks/examiner_attempts"))
    out = {"train_answer_rate": _mean(series("student/answer_rate")),
           "train_searches_per_traj": _mean(series("rollout/searches_per_traj", "student")),
           "gate_pass_rate": gate,
           "gate_pass_n": gate_n,
           "examiner_written_share": sum(written) / sum(sizes) if sum(sizes) else None,
           "groups_with_signal": _mean(series("student/groups_with_signal")),
           "student_reward": _mean(series("student/reward")),
           "answer_rate": None, "searches_per_question": None}
    fails = {k.removeprefix("examiner/gate_fail/") for r in rows for k in r if k.startswith("examiner/gate_fail/")}
    out["gate_failures"] = {k: _mean(series(f"examiner/gate_fail/{k}")) for k in sorted(fails)}
    ev = heldout.report(run)
    for label in ("before", "after"):
        if label in ev:
            out[f"eval_{label}"] = ev[label]
    for i, (group, entry) in enumerate(ev["sets"].items()):
        if i == 0:  # the headline set: em_before, em_after with their SEs, and the paired change
            out["eval_set"] = group
            for label in ("before", "after"):
                if label in entry:
                    m = entry[label]
                    out[f"em_{label}"], out[f"em_{label}_se"], out["eval_n"] = m["em"], m["se"], m["n"]
            if entry.get("change"):
                out["em_change"] = entry["change"]
    if len(ev["sets"]) > 1:
        out["eval_sets"] = ev["sets"]
    if "newest" in ev:  # behaviour of the newest evaluated student on the headline set
        m = ev["newest"]
        out["answer_rate"] = 1.0 - float(m["invalid"]) if finite(m.get("invalid")) else None
        out["searches_per_question"] = float(m["searches"]) if finite(m.get("searches")) else None
    out["targets"] = {k: {"target": t, "value": out.get(k), "met": out.get(k) is not None and out[k] >= t,
                          "what": what} for k, t, what in TARGETS}
    if "em_before" in out and "em_after" in out:
        out["targets"]["em_gain"] = {"target": 0.0, "value": out["em_after"] - out["em_before"],
                                     "met": out["em_after"] > out["em_before"], "what": "held-out EM after - before"}
    return out


def lines(s: dict) -> list[str]:
    """The summary as console lines."""
    def f(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    out = []
    if "em_before" in s or "em_after" in s:
        parts = [f"{label} {f(s[f'em_{label}'])} ± {f(s[f'em_{label}_se'])}"
                 for label in ("before", "after") if f"em_{label}" in s]
        out.append(f"{SET_NAMES.get(s['eval_set'], s['eval_set'] + ' EM')} (n={s['eval_n']}): " + ", ".join(parts))
    if c := s.get("em_change"):
        out.append(f"  paired by question: {c['delta']:+.3f} ± {c['se']:.3f}, {c['gained']} gained, {c['lost']} lost "
                   f"(n={c['n']})")
    for group, entry in list(s.get("eval_sets", {}).items())[1:]:
        parts = [f"{label} {f(entry[label]['em'])} ± {f(entry[label]['se'])}" for label in ("before", "after")
                 if label in entry]
        n = next((entry[label]["n"] for label in ("after", "before") if label in entry), 0)
        change = f", paired {entry['change']['delta']:+.3f} ± {entry['change']['se']:.3f}" if entry.get("change") else ""
        out.append(f"{SET_NAMES.get(group, group + ' EM')} (n={n}): " + ", ".join(parts) + change)
    for k, t in s["targets"].items():
        if k != "em_gain":
            n = f", n={s['gate_pass_n']}" if k == "gate_pass_rate" and s.get("gate_pass_n") else ""
            out.append(f"{t['what']}: {f(t['value'])}{n} (target ≥ {t['target']}) {'ok' if t['met'] else 'MISSED'}")
    worst = sorted(((v, k) for k, v in s.get("gate_failures", {}).items() if v), reverse=True)[:3]
    if worst:
        out.append("examiner tasks failing each gate check: " + ", ".join(f"{k} {v:.2f}" for v, k in worst))
    out.append(f"student training reward {f(s['student_reward'])}, answer rate {f(s['train_answer_rate'])}, "
               f"searches per trajectory {f(s['train_searches_per_traj'])}")
    return out


def write(run_dir: str | Path) -> dict:
    """Compute and write `summary.json` atomically; returns the summary."""
    s = compute(run_dir)
    write_atomic(Path(run_dir) / SUMMARY, json.dumps(s, indent=1))
    return s
