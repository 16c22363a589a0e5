"""Whether a Ray cluster can hold the actors a config asks for, checked before any actor is created.

Without this, a head with too few CPUs (e.g. `ray start --head` on a 2-core machine and configs/tiny.yaml)
leaves the learner's placement group pending until a 10-minute timeout. The demand comes from
:mod:`piplay_ray.cluster.layout` (the one place that adds it up); the comparison is pure, the Ray query is one call.
"""

from __future__ import annotations

from piplay_ray.cluster.layout import Layout, fits, layout
from piplay_ray.errors import UserInputError


class ResourceError(UserInputError):
    """The cluster is too small for the config; the message names what is needed and what is there."""


def _parts(lay: Layout, unit: str) -> str:
    cpu = unit == "CPU"
    parts = [f"learner {lay.learner_cpus if cpu else lay.learner_gpus:g}"]
    parts += [f"{role} rollout {n:g}" for role, n in (lay.rollout_cpus if cpu else lay.rollout_gpus).items()]
    parts.append(f"teacher {lay.teacher_cpus if cpu else lay.teacher_gpus:g}")
    if cpu:
        parts.append(f"search env {lay.search_cpus:g}")
    return ", ".join(parts)


def shortfall(lay: Layout, cpus: float, gpus: float, node_gpus: list[float]) -> list[str]:
    """What `lay` needs that a cluster of `cpus` CPUs and `gpus` GPUs (per node: `node_gpus`) lacks."""
    problems = []
    if lay.total_cpus > cpus + 1e-9:
        problems.append(f"{lay.total_cpus:g} CPUs ({_parts(lay, 'CPU')}) but the cluster has {cpus:g}")
    if lay.total_gpus > gpus + 1e-9:
        problems.append(f"{lay.total_gpus:g} GPUs ({_parts(lay, 'GPU')}) but the cluster has {gpus:g}")
    elif lay.placements and not fits(lay, node_gpus):
        problems.append(f"single-node GPU placements {list(lay.placements)} but the nodes have "
                        f"{sorted(node_gpus, reverse=True)} GPUs")
    return problems


def check_cluster(cfg) -> None:
    """Raise :class:`ResourceError` when the connected Ray cluster cannot hold `cfg`'s actors at once."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus, gpus = sum(r.get("CPU", 0.0) for r in nodes), sum(r.get("GPU", 0.0) for r in nodes)
    problems = shortfall(layout(cfg), cpus, gpus, [r.get("GPU", 0.0) for r in nodes])
    if problems:
        hint = ("start Ray with more (`ray start --head --num-cpus N`, or `ray.num_cpus` in local mode), or lower "
                "learner.num_cpus_per_rank, rollout.num_cpus_per_worker, teacher.num_cpus, "
                "search.num_cpus_per_replica (and their num_gpus)")
        raise ResourceError(f"the Ray cluster is too small for this config: it needs {'; and '.join(problems)}; "
                            f"{hint}")
