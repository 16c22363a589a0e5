"""`piplay config show --config F [overrides...]`: print the resolved, validated config."""

from __future__ import annotations

from piplay_ray.config import dump_config, load_config


def run(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0
