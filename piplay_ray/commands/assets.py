"""`piplay assets [--home DIR]`: build the embedded model, corpus and tiny test model (idempotent, verified)."""

from __future__ import annotations

import os


def run(args) -> int:
    if args.home:
        os.environ["PIPLAY_HOME"] = os.path.abspath(args.home)
    from piplay_ray import assets  # after PIPLAY_HOME is set

    for name, path in assets.build_all().items():
        print(f"{name}: {path}")
    return 0
