"""One device rule for every GPU actor (cluster/devices.py): Ray's default, NOSET with and without the node's
CUDA_VISIBLE_DEVICES, and CPU; and the learner, the rollout worker and the teacher all ask it."""

from __future__ import annotations

import inspect

import pytest

from piplay_ray.actors import rollout
from piplay_ray.cluster.devices import NOSET, Devices, select
from piplay_ray.learner import rank_env
from piplay_ray.teacher import actor as teacher_actor


def test_ray_default_the_actors_gpus_are_the_only_visible_ones():
    # a TP-2 engine given GPUs 2 and 3: Ray set CUDA_VISIBLE_DEVICES=2,3, so they are cuda:0 and cuda:1
    assert select(["2", "3"], {"CUDA_VISIBLE_DEVICES": "2,3"}) == Devices(0, {})
    assert select([7], {NOSET: "0"}) == Devices(0, {})  # "0" does not turn NOSET on


def test_noset_without_visible_devices_uses_ray_ids_and_confines_child_processes():
    got = select(["5", "6"], {NOSET: "1"})
    assert got.index == 5  # not cuda:0, another actor's GPU
    assert got.child_env == {"CUDA_VISIBLE_DEVICES": "5,6"}  # vLLM's workers see exactly the engine's GPUs


def test_noset_with_the_nodes_visible_devices_maps_through_them():
    got = select(["6"], {NOSET: "1", "CUDA_VISIBLE_DEVICES": "4,6,7"})
    assert got == Devices(1, {"CUDA_VISIBLE_DEVICES": "6"})
    with pytest.raises(ValueError, match="does not list"):
        select(["2"], {NOSET: "1", "CUDA_VISIBLE_DEVICES": "4,6"})


def test_cpu_has_no_device():
    assert select([], {NOSET: "1"}) == Devices(None)


@pytest.mark.parametrize("module, call", [(rank_env, "devices.select("), (rollout, "devices.claim()"),
                                          (teacher_actor, "devices.claim()")])
def test_every_gpu_actor_asks_the_one_rule(module, call):
    assert call in inspect.getsource(module)
