"""The accelerator layout a config asks for, so deployments can be sized from the config and checked against it.

Pure arithmetic over the config: no Ray. The units are the ones Ray schedules with (`num_gpus`, `num_cpus`).
A rollout engine is a placement group of `tensor_parallel_size` bundles of `num_gpus_per_worker` GPUs each,
and all of an engine's bundles must sit on one node (tensor parallelism needs NVLink/shared memory); learner
ranks and the teacher are single-node placements (no teacher with `teacher.backend: shared`: it is an adapter
on the student's engines). :func:`fits` checks a layout against a list of node sizes,
which is how the manifests' GPU worker pods are tested against the configs.

`python -m piplay_ray.cluster.layout CONFIG [overrides...]` prints the layout as JSON (used by the Slurm script), with
the host shared memory the config needs per node next to what its KubeRay manifests give (host_memory.py),
and the persistent storage a run needs next to the shared volume's claim (storage.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

from piplay_ray.cluster import host_memory, storage
from piplay_ray.config import Config, ConfigError, load_config
from piplay_ray.roles import TRAINED


@dataclass(frozen=True)
class Layout:
    learner_gpus: float  # world_size * num_gpus_per_rank
    rollout_gpus: dict[str, float]  # role -> workers_per_role * tensor_parallel_size * num_gpus_per_worker
    teacher_gpus: float
    learner_cpus: float
    rollout_cpus: dict[str, float]
    teacher_cpus: float
    search_cpus: float  # search-env replicas (the retriever service itself runs outside Ray)
    placements: tuple[float, ...]  # GPU demand of each placement that must land on a single node

    @property
    def total_gpus(self) -> float:
        return self.learner_gpus + sum(self.rollout_gpus.values()) + self.teacher_gpus

    @property
    def total_cpus(self) -> float:
        return self.learner_cpus + sum(self.rollout_cpus.values()) + self.teacher_cpus + self.search_cpus

    def to_dict(self) -> dict:
        return {**asdict(self), "total_gpus": self.total_gpus, "total_cpus": self.total_cpus}


def layout(cfg: Config, roles: tuple[str, ...] = TRAINED) -> Layout:
    """The GPUs and CPUs the actors of `cfg` request from Ray; one rollout pool per role in `roles`."""
    r, lr, t = cfg.rollout, cfg.learner, cfg.teacher
    own = t.backend != "shared"  # a shared teacher is an adapter on the student's engines: no actor of its own
    engine_gpus = r.tensor_parallel_size * r.num_gpus_per_worker
    placements = [lr.num_gpus_per_rank] * lr.world_size
    placements += [engine_gpus] * (r.workers_per_role * len(roles)) + [t.num_gpus * own]
    return Layout(
        learner_gpus=lr.world_size * lr.num_gpus_per_rank,
        rollout_gpus={role: r.workers_per_role * engine_gpus for role in roles},
        teacher_gpus=t.num_gpus * own,
        learner_cpus=lr.world_size * lr.num_cpus_per_rank,
        rollout_cpus={role: r.workers_per_role * r.num_cpus_per_worker for role in roles},
        teacher_cpus=t.num_cpus * own,
        search_cpus=cfg.search.replicas * cfg.search.num_cpus_per_replica,
        placements=tuple(sorted((p for p in placements if p > 0), reverse=True)),
    )


def fits(lay: Layout, node_gpus: list[float]) -> bool:
    """Whether every single-node placement of `lay` fits on nodes of the given GPU counts (first-fit decreasing).

    First-fit decreasing can miss a packing that exists, so False means "not found"; the shipped layouts are
    simple enough that it finds theirs.
    """
    free = sorted(node_gpus, reverse=True)
    for need in lay.placements:
        for i, room in enumerate(free):
            if room + 1e-9 >= need:
                free[i] = room - need
                break
        else:
            return False
    return True


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

    print(json.dumps({**layout(cfg).to_dict(), "shared_memory": host_memory.report(cfg, args[0]),
                      "storage": storage.report(cfg)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
