"""`piplay experiment --config configs/experiments/F.yaml [--parallel] [overrides...]`: arms x seeds of one run config on equal terms, then a table and a plot.

Arms differ only in their overrides (e.g. `teacher.privileged: qcp | answer | none`). By default
(`task_sets: own`) every arm runs the whole loop: its examiner is trained against its own student and writes
that student's task sets, as in the paper's ablation ("Dr. Zero's self-play alone" is the `none` arm's own
loop). `task_sets: shared` is the cheaper control: a *tasks* run trains the examiner and writes every
iteration's task set once (with one iteration it trains no student; with more it is a full run of the
config), and each arm skips the examiner (`schedule.examiner_steps=0`) and trains on those sets
(`examiner.task_sets_from`), so the arms differ in nothing but the student phase. The result files say which
(`task_sets`, and each run's examiner and student steps).

Each arm evaluates the student every `eval_every` student steps. The starting checkpoint and the held-out
set depend on the seed only (arms may not override `model`, `search`, `eval`, `rollout` or `run`), and
evaluation is greedy, so each seed's start is evaluated once — by the tasks run for the first seed of a
shared experiment, else by the seed's first arm — and is step 0 of every arm of that seed. Every run is an
ordinary run directory under the experiment's folder, run as its own `piplay train` process; a finished run
(its summary.json written) is never rerun and an unfinished one resumes from its checkpoint, so a second
invocation picks up where the first stopped.

Runs go one after another, or with `parallel` (`--parallel`) as Ray tasks side by side on one cluster
(:mod:`piplay_ray.cluster.run_tasks`), in waves that respect what each run reads: the runs that build a
seed's start (and the tasks run) first, then the rest.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from piplay_ray.cluster import run_tasks
from piplay_ray.cluster.layout import layout
from piplay_ray.config import ConfigError, Section, load_config
from piplay_ray.rundir import METRICS, SUMMARY, eval_dir, step_eval_name

SHARED_START = ("model", "search", "eval", "rollout", "run")  # config sections the start depends on


def run(args) -> int:
    spec = load_spec(args.config)
    spec.parallel = spec.parallel or args.parallel
    for kind, path in Experiment(spec, args.overrides).run().items():
        print(f"{kind}: {path}")
    return 0


class ExperimentSpec(Section):
    name: str
    config: str  # the run config every arm starts from, relative to the experiment file
    overrides: list[str] = Field(default_factory=list)  # for every run, tasks run included
    arms: dict[str, list[str]]  # arm name -> its overrides
    baseline: str  # the arm whose final EM the table measures the others against
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    eval_every: int = Field(2, ge=1)  # student steps between held-out evaluations
    root: str = "runs/experiments"
    parallel: bool = False  # runs of a wave side by side as Ray tasks (a cluster, or one big machine)
    # own: each arm's examiner trained against its own student (the paper's ablation); shared: one tasks run
    # writes the task sets every arm trains on, with no examiner steps of their own (a cheaper control)
    task_sets: Literal["own", "shared"] = "own"


def load_spec(path: str | Path) -> ExperimentSpec:
    """The experiment file, validated; its `config` made absolute. Errors name the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment file is a mapping (name, config, arms, baseline, ...)")
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                                  for err in e.errors())) from None
    if spec.baseline not in spec.arms:
        raise ConfigError(f"{path}: baseline: {spec.baseline!r} is not an arm (arms: {', '.join(spec.arms)})")
    for arm, overrides in spec.arms.items():
        for o in overrides:
            if o.split("=", 1)[0].split(".", 1)[0] in SHARED_START:
                raise ConfigError(f"{path}: arms.{arm}: {o.split('=', 1)[0]} may not differ between arms (an arm "
                                  f"shares its seed's starting checkpoint and evaluation; not: {', '.join(SHARED_START)})")
    spec.config = str((path.parent / spec.config).resolve())
    for overrides in [[], *spec.arms.values()]:  # every run's config must load
        load_config(spec.config, [*spec.overrides, *overrides])
    return spec


class Experiment:
    """The runs of a spec under `root/name/`: `tasks/` first, then `arms/<arm>-seed<seed>/`."""

    def __init__(self, spec: ExperimentSpec, extra: list[str] = ()):
        self.spec, self.extra = spec, list(extra)
        self.dir = Path(spec.root) / spec.name

    @property
    def tasks_dir(self) -> Path:
        return self.dir / "tasks"

    def arm_dir(self, arm: str, seed: int) -> Path:
        return self.dir / "arms" / f"{arm}-seed{seed}"

    @property
    def shared(self) -> bool:
        return self.spec.task_sets == "shared"

    def runs(self) -> list[tuple[str, int | None, Path, list[str]]]:
        """(arm, seed, run dir, overrides) of every run, in the order they run (the tasks run has no seed)."""
        s, base = self.spec, [*self.spec.overrides, *self.extra]
        out = []
        if self.shared:  # the task sets every arm trains on: as many tasks as an arm's student phase trains
            cfg = load_config(s.config, base)
            out.append(("tasks", None, self.tasks_dir, [
                *base, "eval.every=0", *(["schedule.student_steps=0"] if cfg.schedule.iterations == 1 else []),
                f"examiner.task_set_size={cfg.task_set_size}", f"eval.every_student_steps={s.eval_every}",
                f"run.seed={s.seeds[0]}"]))
        given = ["schedule.examiner_steps=0", f"examiner.task_sets_from={self.tasks_dir}"] if self.shared else []
        for arm, arm_overrides in s.arms.items():
            for seed in s.seeds:
                out.append((arm, seed, self.arm_dir(arm, seed), [
                    *base, *arm_overrides, f"run.seed={seed}", *given,
                    "eval.every=0",  # the curve's evaluations only (an end-of-iteration one would repeat the last)
                    f"eval.every_student_steps={s.eval_every}",
                    f"eval.before_training={str(self.start_dir(seed) == self.arm_dir(arm, seed)).lower()}"]))
        return out

    def start_dir(self, seed: int) -> Path:
        """The run that evaluates `seed`'s starting checkpoint: the tasks run (first seed, shared), else the
        seed's first arm."""
        if self.shared and seed == self.spec.seeds[0]:
            return self.tasks_dir
        return self.arm_dir(next(iter(self.spec.arms)), seed)

    def waves(self) -> list[list[tuple[str, int | None, Path, list[str]]]]:
        """The runs in groups that may run at once: first the tasks run (it writes the task sets the arms read)
        and every run that evaluates (and so builds) a seed's start, then the rest (a seed's warm start is
        built once, by its start run, before its other arms ask for it). Shared: the tasks run alone first,
        since it also builds the first seed's start."""
        runs = self.runs()
        if self.shared:
            tasks, *runs = runs
            first = [r for r in runs if r[1] == self.spec.seeds[0] or r[2] == self.start_dir(r[1])]
            return [[tasks], first, [r for r in runs if r not in first]]
        first = [r for r in runs if r[2] == self.start_dir(r[1])]
        return [first, [r for r in runs if r not in first]]

    def run(self) -> dict[str, Path]:
        """Run what is not finished yet, wave by wave, then write the report; returns its paths."""
        from piplay_ray.monitor import report

        address = None
        for wave in self.waves():
            todo = {}
            for arm, seed, run_dir, overrides in wave:
                label = arm if seed is None else f"{arm} (seed {seed})"
                if (run_dir / SUMMARY).is_file():
                    print(f"[piplay experiment] {label}: finished before, kept ({run_dir})", flush=True)
                else:
                    todo[label] = ([sys.executable, "-m", "piplay_ray", "train", "--config", self.spec.config,
                                    *overrides, f"run.dir={run_dir}"], run_dir)
            if todo and self.spec.parallel:
                address = address or self._connect()
                failed = run_tasks.run_together(todo, address)
            else:
                failed = [self._run_here(label, cmd, run_dir) for label, (cmd, run_dir) in todo.items()]
            if any(failed):
                raise RuntimeError("\n".join(f for f in failed if f) + "\n(run the experiment again to resume)")
        points, finals, steps = [], {}, []  # finals: (arm, seed) -> its final evaluation's EM per question
        for arm, seed, run_dir, _ in self.runs():
            steps.append({"arm": arm, "seed": seed, **report.learner_steps(run_dir / METRICS)})
            if seed is None:  # the tasks run: no arm
                continue
            own = report.curve(run_dir / METRICS, arm, seed)
            if self.start_dir(seed) != run_dir:  # step 0: the seed's start, evaluated once
                own = [p for p in report.curve(self.start_dir(seed) / METRICS, arm, seed) if p["student_step"] == 0] + own
            points += own
            path = eval_dir(run_dir, step_eval_name(max(p["student_step"] for p in own))) / "examples.jsonl"
            if path.is_file():
                finals[(arm, seed)] = report.answers(path)
        how = ("shared: written once by the tasks run, the arms train no examiner" if self.shared else
               "each arm's own self-play (its examiner trained against its own student)")
        header = (f"# Experiment {self.spec.name}\n\nconfig `{self.spec.config}`, overrides "
                  f"`{' '.join(self.spec.overrides) or '-'}`, seeds {self.spec.seeds}, evaluation every "
                  f"{self.spec.eval_every} student steps; task sets: {how}.\n\n")
        return report.write(points, self.spec.baseline, self.dir, header, report.paired(finals, self.spec.baseline),
                            {"task_sets": self.spec.task_sets, "runs": steps})

    @staticmethod
    def _run_here(label: str, cmd: list[str], run_dir: Path) -> str:
        """One run in a process on this machine (output on the terminal); a failure's description or ''."""
        print(f"[piplay experiment] {label}: running in {run_dir}", flush=True)
        code = subprocess.run(cmd).returncode
        return f"{label}: `piplay train` failed ({code}); its run directory is {run_dir}" if code else ""

    def _connect(self) -> str:
        """The Ray cluster the runs join, with room on this machine for the largest wave when started here."""
        configs = [load_config(self.spec.config, overrides) for *_, overrides in self.runs()]
        return run_tasks.connect(configs[0], max(len(w) for w in self.waves()) *
                                        max(layout(c).total_cpus for c in configs))
