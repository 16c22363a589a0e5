"""The placement a run reserves (cluster/placement.py) on a simulated two-node Ray cluster of 8 logical GPUs per
node: for the shipped multi-GPU configs every GPU actor lands on the node `layout.plan` gives it, the learner's
ranks share one node, and no two actors share a GPU. The actors are stand-ins holding the resource requests the
real ones take (`Placement.options`, which the learner group, the rollout pools and the teacher ask)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import ray

from piplay_ray.cluster.layout import layout, plan
from piplay_ray.cluster.placement import Placement
from piplay_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
NODES = 2


@ray.remote
class Probe:
    def where(self) -> tuple[str, list]:
        return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster()
    for _ in range(NODES):
        cluster.add_node(num_cpus=64, num_gpus=8)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_the_plan_puts_the_learner_first_and_together():
    """Worked by hand: qwen3-8b is 6 learner ranks + 4 TP-2 engines + a teacher = 15 GPUs on 2 x 8."""
    nodes = plan(layout(load_config(ROOT / "configs/cluster/qwen3-8b.yaml")), [8, 8])
    assert [sorted(s.name for s in n) for n in nodes] == [
        [*(f"learner-{i}" for i in range(6)), "rollout-examiner-0"],
        ["rollout-examiner-1", "rollout-student-0", "rollout-student-1", "teacher"]]
    # one node too small for the six ranks: they spread (first fit), and still every actor is placed
    spread = plan(layout(load_config(ROOT / "configs/cluster/qwen3-8b.yaml")), [5, 5, 5])
    assert spread is not None and sum(1 for n in spread if any(s.name.startswith("learner") for s in n)) == 2


@pytest.mark.parametrize("name", ["qwen3-8b.yaml", "qwen3-4b.yaml", "qwen3-8b-lora.yaml"])
def test_every_gpu_actor_lands_where_the_layout_says(two_nodes, name):
    lay = layout(load_config(ROOT / "configs/cluster" / name))
    nodes = [n for n in plan(lay, [8.0] * NODES) if n]
    placement = Placement(lay, timeout_s=120)
    try:
        probes = {s.name: Probe.options(**placement.options(s.name)).remote() for s in lay.slots}
        where = dict(zip(probes, ray.get([p.where.remote() for p in probes.values()]), strict=True))
        real = [{where[s.name][0] for s in n} for n in nodes]
        assert all(len(r) == 1 for r in real), f"a planned node's actors were split: {real}"
        assert len({next(iter(r)) for r in real}) == len(nodes)  # each planned node is its own node
        assert len({where[s.name][0] for s in lay.slots if s.name.startswith("learner-")}) == 1
        for s in lay.slots:
            assert len(where[s.name][1]) == s.gpus  # the actor holds exactly its GPUs
        per_node = Counter((node, g) for node, gpus in where.values() for g in gpus)
        assert max(per_node.values()) == 1  # no GPU is shared
        for p in probes.values():
            ray.kill(p)
    finally:
        placement.remove()
