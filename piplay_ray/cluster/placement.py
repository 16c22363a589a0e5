"""Reserve a config's GPU actors where `layout.plan` puts them, before any actor starts.

Created one by one, Ray placed the rollout engines and the teacher first and the learner's ranks in whatever
room was left (a soft PACK), so the ZeRO-3 ranks of a two-node run could end up split across nodes.
Here every planned node becomes one STRICT_PACK placement group holding the bundles of all its actors, the
learner's node first, and every GPU actor is created inside its bundle with its resources taken from the
same `layout.Slot` (`options`). A restarted actor comes back in its bundle, so the plan holds for the run.
"""

from __future__ import annotations

from piplay_ray.cluster.layout import Layout, plan
from piplay_ray.cluster.resources import ResourceError


class Placement:
    def __init__(self, lay: Layout, timeout_s: float = 600.0):
        import ray
        from ray.util.placement_group import placement_group

        node_gpus = [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        nodes = plan(lay, sorted(node_gpus, reverse=True))
        if nodes is None:
            raise ResourceError(f"no node plan for the GPU actors {[s.gpus for s in lay.slots]} on nodes with "
                                f"{sorted(node_gpus, reverse=True)} GPUs")
        self.groups, self._where = [], {}
        for slots in sorted((n for n in nodes if n), key=lambda n: not any(s.name.startswith("learner-") for s in n)):
            pg = placement_group([s.bundle for s in slots], strategy="STRICT_PACK")
            self.groups.append(pg)
            self._where |= {s.name: (pg, i, s) for i, s in enumerate(slots)}
        try:
            ray.get([pg.ready() for pg in self.groups], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.remove()
            raise ResourceError(f"the planned GPU nodes were not free within {timeout_s:g} s: "
                                f"{[[s.name for s in n] for n in nodes if n]}") from None

    def options(self, name: str) -> dict:
        """`num_cpus`, `num_gpus` and the scheduling strategy of the actor named `name` (a `Slot`'s name)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg, index, slot = self._where[name]
        return {"num_cpus": slot.cpus, "num_gpus": slot.gpus,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}

    def holds(self, name: str) -> bool:
        return name in self._where

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups:
            remove_placement_group(pg)
        self.groups, self._where = [], {}


def resources(placement: Placement | None, name: str, default: dict) -> dict:
    """The actor `name`'s resources and bundle in the run's placement; `default` where it has none (a CPU run,
    a test, an actor that asks for no GPU)."""
    return placement.options(name) if placement is not None and placement.holds(name) else default
