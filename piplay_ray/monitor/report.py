"""What an experiment's arms showed: the curve points, a table and a plot. Pure over the runs' metrics files.

Every held-out evaluation of every arm and seed is one curve point (arm, seed, student step, EM, F1), on the
headline set: the natural questions where the run evaluated them, else all questions. The table
gives each arm's final EM as the mean over seeds ± the sample standard deviation (over n seeds; with one seed
no spread is claimed), and the student steps the arm needs before its mean EM reaches the baseline arm's final
mean EM (the paper's "reaches in one iteration what the other reaches in three"); `—` where it never does.
Every arm answers the same held-out questions, greedily, so the table also gives each arm's final EM minus the
baseline's *paired* by question and seed (mean ± standard error over the pairs): far less noisy than comparing
two means of a hundred questions each.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from piplay_ray.records import NATURAL_SOURCE


def curve(metrics_path: str | Path, arm: str, seed: int | None) -> list[dict]:
    """The evaluation points of one run, oldest first (a re-done step keeps its last evaluation)."""
    points: dict[int, dict] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "eval/overall/em" not in row:
                continue
            g = f"eval/{NATURAL_SOURCE}" if f"eval/{NATURAL_SOURCE}/em" in row else "eval/overall"  # the headline
            step = int(row.get("student_step", row.get("step", 0)))
            points[step] = {"arm": arm, "seed": seed, "student_step": step, "em": float(row[f"{g}/em"]),
                            "f1": float(row.get(f"{g}/f1", math.nan)), "n": int(row.get(f"{g}/n", 0))}
    return [points[s] for s in sorted(points)]


def learner_steps(metrics_path: str | Path) -> dict[str, int]:
    """`examiner_steps` and `student_steps`: the learner steps a run's metrics record (a re-done step once)."""
    done: dict[str, set] = {"examiner": set(), "student": set()}
    with open(metrics_path, encoding="utf-8") as f:
        for row in map(json.loads, f):
            if "learner/version" in row and row.get("phase") in done:
                done[row["phase"]].add(row["learner/version"])
    return {f"{role}_steps": len(versions) for role, versions in done.items()}


def answers(examples_path: str | Path) -> dict[str, float]:
    """Question id -> EM, from one evaluation's examples.jsonl: the natural questions where it has them."""
    with open(examples_path, encoding="utf-8") as f:
        rows = list(map(json.loads, f))
    natural = [r for r in rows if r.get("data_source") == NATURAL_SOURCE]
    return {r["id"]: float(r["em"]) for r in natural or rows}


def paired(finals: dict[tuple[str, int], dict[str, float]], baseline: str) -> dict[str, dict]:
    """Per arm: its final EM minus the baseline's on the same question and seed — mean, standard error, pairs.
    `finals[(arm, seed)]` is that run's final evaluation (`answers`)."""
    diffs: dict[str, list[float]] = defaultdict(list)
    for (arm, seed), ems in finals.items():
        base = finals.get((baseline, seed), {})
        diffs[arm] += [ems[q] - base[q] for q in sorted(ems.keys() & base.keys())]
    return {arm: {"delta": statistics.fmean(d), "se": statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0,
                  "pairs": len(d)} for arm, d in diffs.items() if d}


def _by_arm_step(points: list[dict]) -> dict[str, dict[int, list[float]]]:
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        out[p["arm"]][p["student_step"]].append(p["em"])
    return out


def summary(points: list[dict], baseline: str, deltas: dict[str, dict] | None = None) -> list[dict]:
    """Per arm: final EM mean and spread over seeds, the steps to reach the baseline's final mean EM, and its
    paired difference to the baseline (`deltas`, from `paired`) where given."""
    table = _by_arm_step(points)
    if baseline not in table:
        raise ValueError(f"the baseline arm {baseline!r} has no evaluation (arms: {', '.join(sorted(table))})")
    target = statistics.fmean(table[baseline][max(table[baseline])])
    rows = []
    for arm, steps in table.items():
        final = steps[max(steps)]
        reach = next((s for s in sorted(steps) if statistics.fmean(steps[s]) >= target), None)
        rows.append({"arm": arm, "final_em": statistics.fmean(final),
                     "spread": statistics.stdev(final) if len(final) > 1 else None, "seeds": len(final),
                     "final_step": max(steps), "steps_to_baseline": reach, "n": max(p["n"] for p in points
                                                                                   if p["arm"] == arm),
                     "paired": (deltas or {}).get(arm)})
    return rows


def markdown(rows: list[dict], baseline: str) -> str:
    lines = [f"| arm | final EM (mean ± sd over seeds) | seeds | eval questions | student steps to reach "
             f"`{baseline}`'s final EM | final EM − `{baseline}`'s, paired (± SE) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        spread = "" if r["spread"] is None else f" ± {r['spread']:.3f}"
        reach = "—" if r["steps_to_baseline"] is None else str(r["steps_to_baseline"])
        d = r.get("paired")
        delta = "—" if d is None or r["arm"] == baseline else f"{d['delta']:+.3f} ± {d['se']:.3f} ({d['pairs']} pairs)"
        lines.append(f"| {r['arm']} | {r['final_em']:.3f}{spread} | {r['seeds']} | {r['n']} | {reach} | {delta} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: str | Path) -> None:
    """EM against student steps per arm: the mean over seeds, shaded between the seeds' min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, steps in sorted(_by_arm_step(points).items()):
        xs = sorted(steps)
        ax.plot(xs, [statistics.fmean(steps[x]) for x in xs], marker="o", label=arm)
        ax.fill_between(xs, [min(steps[x]) for x in xs], [max(steps[x]) for x in xs], alpha=0.2)
    _save(fig, ax, path, "held-out EM")


def _save(fig, ax, path: str | Path, ylabel: str) -> None:
    """Label, legend and grid an EM-against-student-steps plot, write it and free it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("student steps")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def runs_markdown(runs: list[dict]) -> str:
    """What each run trained: its learner steps per role (`learner_steps`)."""
    lines = ["| run | seed | examiner steps | student steps |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['arm']} | {'—' if r['seed'] is None else r['seed']} | {r['examiner_steps']} | "
              f"{r['student_steps']} |" for r in runs]
    return "\n".join(lines) + "\n"


def write(points: list[dict], baseline: str, out_dir: str | Path, header: str = "",
          deltas: dict[str, dict] | None = None, runs: dict | None = None) -> dict[str, Path]:
    """experiment.json (every point, and `runs`: how the task sets were made and each run's learner steps),
    experiment.md (the tables) and experiment.png (the curves)."""
    out = Path(out_dir)
    rows = summary(points, baseline, deltas)
    paths = {"json": out / "experiment.json", "md": out / "experiment.md", "png": out / "experiment.png"}
    paths["json"].write_text(json.dumps({"baseline": baseline, "points": points, "summary": rows, **(runs or {})},
                                        indent=1))
    paths["md"].write_text(header + markdown(rows, baseline) + ("\n" + runs_markdown(runs["runs"]) if runs else ""))
    plot(points, paths["png"])
    return paths


# ------------------------------------------------------------------------------------------ one run's curve


def curve_markdown(points: list[dict]) -> str:
    """A run's evaluations (`heldout.curve`) as a table: EM ± SE per set at each evaluation."""
    sets = list(dict.fromkeys(g for p in points for g in p["sets"]))
    lines = ["| evaluation | student step | " + " | ".join(f"{g} EM ± SE (n)" for g in sets) + " |",
             "| --- | --- | " + " | ".join("---" for _ in sets) + " |"]
    for p in points:
        cells = [f"{m['em']:.3f} ± {m['se']:.3f} ({m['n']})" if (m := p["sets"].get(g)) and m["se"] is not None
                 else "—" for g in sets]
        step = "—" if p["student_step"] is None else str(p["student_step"])
        lines.append(f"| {p['name']} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(points: list[dict], path: str | Path) -> None:
    """EM against the evaluation (student step where known) per set, with ± one standard error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["student_step"] if p["student_step"] is not None else i for i, p in enumerate(points)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in dict.fromkeys(g for p in points for g in p["sets"]):
        got = [(x, p["sets"][g]) for x, p in zip(xs, points, strict=True) if g in p["sets"]]
        ax.errorbar([x for x, _ in got], [m["em"] for _, m in got], yerr=[m["se"] or 0 for _, m in got],
                    marker="o", capsize=3, label=f"{g} (n={got[-1][1]['n']})")
    _save(fig, ax, path, "EM (greedy)")
