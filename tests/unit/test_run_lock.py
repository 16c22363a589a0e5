"""One driver per run directory: a second one is refused with the holder named; a dead driver's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from piplay_ray.errors import UserInputError
from piplay_ray.rundir import DRIVER_LOCK, RunDir

HOLD = "import sys, time; from pathlib import Path; from piplay_ray.rundir import RunDir; " \
       "run = RunDir(Path(sys.argv[1])); run.lock(); print('held', flush=True); time.sleep(60)"


def test_a_second_driver_is_refused_and_a_dead_drivers_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserInputError) as e:
            RunDir(tmp_path).lock()
        assert f"pid {holder.pid} on " in str(e.value) and "set run.dir to another folder" in str(e.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a driver that dies without cleaning up
        holder.wait()
    run = RunDir(tmp_path)
    run.lock()  # the kernel dropped the dead driver's lock
    assert (tmp_path / DRIVER_LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(UserInputError, match=f"pid {os.getpid()}"):
        RunDir(tmp_path).lock()  # a second open in the same process is a second driver too
    run.unlock()
    again = RunDir(tmp_path)
    again.lock()  # released: the next driver takes it
    again.unlock()
