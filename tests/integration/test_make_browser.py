"""`make browser` (run by `make test`): a machine without Chromium that cannot install it stops with a message
instead of letting the dashboard browser tests skip; PIPLAY_SKIP_BROWSER=1 is the explicit way out."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from helpers.runs import ROOT

MAKE = shutil.which("make")


def _make_browser(tmp_path, **env):
    """`make browser` with a PATH holding only a fake `id` (not root) and no chromium or apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    return subprocess.run([MAKE, "-s", "-C", str(ROOT), "browser"], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp"), **env})


@pytest.mark.skipif(MAKE is None, reason="needs make")
def test_browser_target_stops_without_chromium(tmp_path):
    res = _make_browser(tmp_path)
    assert res.returncode != 0
    assert "chromium is missing" in res.stderr and "PIPLAY_SKIP_BROWSER=1" in res.stderr
    assert _make_browser(tmp_path, PIPLAY_SKIP_BROWSER="1").returncode == 0
