"""The accelerator layout a config asks for, so deployments can be sized from the config and checked against it.

Pure arithmetic over the config: no Ray. The units are the ones Ray schedules with (`num_gpus`, `num_cpus`).
A rollout engine is a placement group of `tensor_parallel_size` bundles of `num_gpus_per_worker` GPUs each,
and all of an engine's bundles must sit on one node (tensor parallelism needs NVLink/shared memory); learner
ranks and the teacher are single-node placements (no teacher with `teacher.backend: shared`: it is an adapter
on the student's engines). :func:`plan` places every GPU actor (a `Slot`) on a node, the learner's ranks
first and together where one node holds them all; `placement.py` reserves exactly that plan on Ray before
any actor starts, so the plan is what runs, not an estimate. :func:`fits` (a plan exists) is how the
manifests' GPU worker pods are tested against the configs.

`python -m piplay_ray.cluster.layout CONFIG [overrides...]` prints the layout as JSON (used by the Slurm script),
with each GPU actor's memory against its card (gpu_memory.py), the host shared memory the config needs per
node next to what its KubeRay manifests give (host_memory.py), and the persistent storage a run needs next
to the shared volume's claim (storage.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

from piplay_ray.cluster import gpu_memory, host_memory, storage
from piplay_ray.config import Config, ConfigError, load_config
from piplay_ray.roles import TRAINED


@dataclass(frozen=True)
class Slot:
    """One GPU actor's resource request, under its name in health.json (`learner-0`, `rollout-student-1`,
    `teacher`); the real actors and the placement both take it from here."""

    name: str
    cpus: float
    gpus: float

    @property
    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


@dataclass(frozen=True)
class Layout:
    learner_gpus: float  # world_size * num_gpus_per_rank
    rollout_gpus: dict[str, float]  # role -> workers_per_role * tensor_parallel_size * num_gpus_per_worker
    teacher_gpus: float
    learner_cpus: float
    rollout_cpus: dict[str, float]
    teacher_cpus: float
    search_cpus: float  # search-env replicas (the retriever service itself runs outside Ray)
    slots: tuple[Slot, ...]  # every GPU actor, learner ranks first

    @property
    def placements(self) -> tuple[float, ...]:
        """The GPU demand of each placement that must land on a single node, largest first."""
        return tuple(sorted((s.gpus for s in self.slots), reverse=True))

    @property
    def total_gpus(self) -> float:
        return self.learner_gpus + sum(self.rollout_gpus.values()) + self.teacher_gpus

    @property
    def total_cpus(self) -> float:
        return self.learner_cpus + sum(self.rollout_cpus.values()) + self.teacher_cpus + self.search_cpus

    def to_dict(self) -> dict:
        return {**asdict(self), "placements": self.placements, "total_gpus": self.total_gpus,
                "total_cpus": self.total_cpus}


def layout(cfg: Config, roles: tuple[str, ...] = TRAINED) -> Layout:
    """The GPUs and CPUs the actors of `cfg` request from Ray; one rollout pool per role in `roles`."""
    r, lr, t = cfg.rollout, cfg.learner, cfg.teacher
    own = t.backend != "shared"  # a shared teacher is an adapter on the student's engines: no actor of its own
    engine_gpus = r.tensor_parallel_size * r.num_gpus_per_worker
    slots = [Slot(f"learner-{i}", lr.num_cpus_per_rank, lr.num_gpus_per_rank) for i in range(lr.world_size)]
    slots += [Slot(f"rollout-{role}-{i}", r.num_cpus_per_worker, engine_gpus)
              for role in roles for i in range(r.workers_per_role)]
    slots += [Slot("teacher", t.num_cpus, t.num_gpus)] if own else []
    return Layout(
        learner_gpus=lr.world_size * lr.num_gpus_per_rank,
        rollout_gpus={role: r.workers_per_role * engine_gpus for role in roles},
        teacher_gpus=t.num_gpus * own,
        learner_cpus=lr.world_size * lr.num_cpus_per_rank,
        rollout_cpus={role: r.workers_per_role * r.num_cpus_per_worker for role in roles},
        teacher_cpus=t.num_cpus * own,
        search_cpus=cfg.search.replicas * cfg.search.num_cpus_per_replica,
        slots=tuple(s for s in slots if s.gpus > 0),
    )


def plan(lay: Layout, node_gpus: list[float]) -> list[list[Slot]] | None:
    """The GPU slots of `lay` on each node (in `node_gpus`' order), or None when no plan is found.

    The learner's ranks go first, all on one node when a node can hold them (ZeRO-3 gathers every layer every
    step: NVLink, not the network), trying the tightest such node first; else spread first-fit. Then the
    engines and the teacher, largest first, first-fit. First-fit can miss a packing that exists, so None
    means "not found"; the shipped layouts are simple enough that it finds theirs.
    """
    learner = [s for s in lay.slots if s.name.startswith("learner-")]
    rest = sorted((s for s in lay.slots if s not in learner), key=lambda s: -s.gpus)
    need = sum(s.gpus for s in learner)
    together = sorted((i for i, g in enumerate(node_gpus) if g + 1e-9 >= need), key=lambda i: node_gpus[i])
    for learner_nodes in [[i] for i in together] + ([] if together else [list(range(len(node_gpus)))]):
        free, nodes = list(node_gpus), [[] for _ in node_gpus]
        if all(_put(s, learner_nodes, free, nodes) for s in learner) and \
                all(_put(s, range(len(free)), free, nodes) for s in rest):
            return nodes
    return None


def _put(slot: Slot, order, free: list[float], nodes: list[list[Slot]]) -> bool:
    """First fit of `slot` over the nodes in `order`."""
    for i in order:
        if free[i] + 1e-9 >= slot.gpus:
            free[i] -= slot.gpus
            nodes[i].append(slot)
            return True
    return False


def fits(lay: Layout, node_gpus: list[float]) -> bool:
    """Whether every single-node placement of `lay` fits on nodes of the given GPU counts (`plan` finds one)."""
    return plan(lay, node_gpus) is not None


def sync_transport(cfg: Config, lay: Layout | None = None) -> str:
    """`weight_sync.transport` as it runs. `collective` on a layout that asks for at most one GPU (every
    actor on the learner's card) runs as `ipc`: its members share the device, where NCCL refuses two ranks
    and gloo goes through host memory. `ipc` itself needs that (or no GPU: shared memory on one node); members
    that do not share the sender's device after all get a clear `SyncError` at the first sync."""
    kind, lay = cfg.weight_sync.transport, lay or layout(cfg)
    one_device = lay.total_gpus <= 1 + 1e-9
    if kind == "ipc" and not one_device:
        raise ConfigError(f"weight_sync.transport=ipc needs every actor on one GPU; this layout asks for "
                          f"{lay.total_gpus:g} (use collective)")
    return "ipc" if kind == "collective" and lay.slots and one_device else kind


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-"):
        print("usage: python -m piplay_ray.cluster.layout CONFIG [section.key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args[0], args[1:])
    except ConfigError as e:
        print(f"piplay: {e}", file=sys.stderr)
        return 2

    lay = layout(cfg)
    memory = gpu_memory.report(cfg) if lay.slots else []  # per GPU actor; the table: python -m ...gpu_memory
    print(json.dumps({**lay.to_dict(), "sync_transport": sync_transport(cfg, lay), "gpu_memory": memory, "shared_memory": host_memory.report(cfg, args[0]),
                      "storage": storage.report(cfg)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
