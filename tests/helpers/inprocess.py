"""`driver.train` in this process with a thread watching the loop, so a test can reach the real actors.

The loop is built by `driver.start_loop` and handed to `train` (its `make_loop` argument): no patching.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from piplay_ray.commands import train as driver


def train_watched(cfg, watch: Callable[[object, threading.Event], None]):
    """Run `driver.train(cfg)`; `watch(loop, stop)` runs on a thread from when the loop exists, and `stop` is
    set when the run ends. Returns the loop (None if it was never built)."""
    box, built, stop = {}, threading.Event(), threading.Event()

    def make_loop(cfg, run):
        box["loop"] = driver.start_loop(cfg, run)
        built.set()
        return box["loop"]

    def watcher():
        while not built.wait(0.05):
            if stop.is_set():
                return
        watch(box["loop"], stop)

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    try:
        driver.train(cfg, make_loop=make_loop)
    finally:
        stop.set()
        thread.join(timeout=10)
    return box.get("loop")


def train_hooked(cfg, install: Callable[[object], None]):
    """Run `driver.train(cfg)` with `install(loop)` called on the loop before it starts (in this thread): a test
    wraps the loop's own coroutines to act at an exact point of the run. Returns the loop."""
    box = {}

    def make_loop(cfg, run):
        box["loop"] = driver.start_loop(cfg, run)
        install(box["loop"])
        return box["loop"]

    driver.train(cfg, make_loop=make_loop)
    return box.get("loop")
