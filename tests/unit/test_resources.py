"""A run checks the cluster against the config's demand (layout.py) before creating actors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers.runs import ROOT

from piplay_ray.cluster.layout import layout
from piplay_ray.cluster.resources import shortfall
from piplay_ray.config import load_config

TINY = ROOT / "configs" / "tiny.yaml"


def test_tiny_needs_more_cpus_than_two():
    lay = layout(load_config(TINY))  # learner 2 + rollouts 1 + 1 + teacher 1 + search env 0.5
    assert lay.total_cpus == 5.5
    (problem,) = shortfall(lay, cpus=2, gpus=0, node_gpus=[0])
    assert problem.startswith("5.5 CPUs (learner 2, examiner rollout 1, student rollout 1, teacher 1, search env 0.5)")
    assert problem.endswith("but the cluster has 2")
    assert shortfall(lay, cpus=5.5, gpus=0, node_gpus=[0]) == []


def test_gpu_totals_and_single_node_placements():
    cfg = load_config(TINY, ["rollout.num_gpus_per_worker=1", "rollout.tensor_parallel_size=4",
                             "learner.num_gpus_per_rank=1"])
    lay = layout(cfg)  # two 4-GPU engines (one node each) + a 1-GPU learner rank
    assert shortfall(lay, 64, 9, [8, 1]) == []
    (problem,) = shortfall(lay, 64, 9, [3, 3, 3])  # enough GPUs in all, but no node holds an engine
    assert "single-node GPU placements [4.0, 4.0, 1.0]" in problem and "[3, 3, 3]" in problem
    (problem,) = shortfall(lay, 64, 4, [4])
    assert problem.startswith("9 GPUs (learner 1, examiner rollout 4, student rollout 4, teacher 0)")


def test_train_on_a_too_small_cluster_fails_in_seconds_naming_the_numbers(tmp_path):
    """`piplay train` with Ray given 2 CPUs: exit 2 and one line, not a 10-minute placement-group wait."""
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "piplay_ray.cli", "train", "-c", str(TINY), "ray.num_cpus=2",
                          f"run.root={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    elapsed = time.monotonic() - t
    assert res.returncode == 2, res.stderr[-3000:]
    assert "needs 5.5 CPUs" in res.stderr and "the cluster has 2" in res.stderr
    assert "Traceback" not in res.stderr
    print(f"refused after {elapsed:.1f} s")  # the report's figure; Ray's own start-up dominates it


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
