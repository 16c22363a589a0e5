"""A scripted search over a small corpus, and the retriever server on a free port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

from piplay_ray.records import Hop


class Search:
    def __init__(self, fn):
        self.fn = fn

    async def search(self, query, topk=None):
        ((docs, text),) = self.fn([query])
        return Hop(query=query, docs=docs), text


def serve_on_any_port(cfg_path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`piplay retriever serve --port 0`: the server binds a free port itself and prints its URL (no race
    between picking a port and binding it)."""
    proc = subprocess.Popen([sys.executable, "-m", "piplay_ray.cli", "retriever", "serve", "--config", str(cfg_path),
                             "--port", "0"], stderr=subprocess.PIPE, text=True, env={**os.environ})
    found: list[str] = []

    def read():  # keep draining stderr, so request logs never fill the pipe
        for line in proc.stderr:
            if not found and (m := re.search(r"serving \w+ on (http://\S+)", line)):
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + timeout
    while not found:
        assert proc.poll() is None and time.time() < deadline, "server did not come up"
        time.sleep(0.1)
    return proc, found[0]
