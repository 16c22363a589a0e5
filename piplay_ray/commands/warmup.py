"""`piplay warmup --config F`: build the protocol warm start the config names (builtin:*-search), cached, and
print each role's folder (`evolution/warmup.py` builds it)."""

from __future__ import annotations

from piplay_ray.config import load_config
from piplay_ray.evolution import warmup
from piplay_ray.roles import MODELS


def run(args) -> int:
    ready = warmup.prepare(load_config(args.config, args.overrides))
    for role in MODELS:
        print(f"{role}: {ready.model.path_for(role)}")
    return 0
