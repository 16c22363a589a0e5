"""`piplay curve RUN_DIR [--out DIR]`: a run's held-out EM at each evaluation, per set: a table and a plot."""

from __future__ import annotations

from pathlib import Path

from piplay_ray.errors import UserInputError
from piplay_ray.monitor import heldout, report


def run(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    points = heldout.curve(run_dir)
    if not points:
        raise UserInputError(f"{args.run_dir}: no evaluation under eval/ (is it a run directory?)")
    out = Path(args.out) if args.out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    table = report.curve_markdown(points)
    (out / "curve.md").write_text(table)
    report.plot_curve(points, out / "curve.png")
    print(table + f"\n(written: {out / 'curve.md'}, {out / 'curve.png'})")
    return 0
