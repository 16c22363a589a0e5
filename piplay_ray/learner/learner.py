"""The DeepSpeed learner group: one Ray actor per data-parallel rank (`rank.LearnerWorkerImpl`).

`LearnerGroup` (driver side) places `learner.world_size` `LearnerWorker` actors in a placement group, wires
them into one torch.distributed group (gloo on CPU, NCCL on GPU) and fans every call out to all ranks:
ZeRO's collectives need every rank in every step, every gather and every checkpoint. The group takes the
whole config and is the one place it is broken down for the ranks (`rank.rank_args`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import ray
import torch

from piplay_ray.config import Config
from piplay_ray.learner import checkpoint
from piplay_ray.learner.rank import LearnerWorkerImpl, rank_args
from piplay_ray.records import Experience
from piplay_ray.roles import TRAINED

log = logging.getLogger(__name__)
LearnerWorker = ray.remote(LearnerWorkerImpl)


class LearnerGroup:
    """Driver-side handle over the learner ranks; every method fans out to all ranks and waits."""

    def __init__(self, cfg: Config, roles: Sequence[str] = TRAINED, placement=None):
        """`placement`: the run's `cluster.placement.Placement`, which reserved the ranks' bundles with every
        other GPU actor's; without one (a learner alone, e.g. the warm start) the group reserves its own."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bad = [r for r in roles if r not in TRAINED]
        if bad or not roles:
            raise ValueError(f"LearnerGroup roles must be a non-empty subset of {TRAINED}, got {list(roles)}")
        self.cfg, self.roles = cfg, tuple(roles)
        self._order = threading.Lock()
        lc = cfg.learner
        ws = lc.world_size
        self.pg = None
        if placement is not None and placement.holds("learner-0"):
            options = [placement.options(f"learner-{r}") for r in range(ws)]
        else:
            bundle = {"CPU": lc.num_cpus_per_rank, **({"GPU": lc.num_gpus_per_rank} if lc.num_gpus_per_rank else {})}
            self.pg = placement_group([dict(bundle) for _ in range(ws)], strategy="PACK")
            ray.get(self.pg.ready(), timeout=600)
            options = [{"num_cpus": lc.num_cpus_per_rank, "num_gpus": lc.num_gpus_per_rank,
                        "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg,
                                                                               placement_group_bundle_index=r)}
                       for r in range(ws)]
        args = rank_args(cfg, self.roles)
        env = {"OMP_NUM_THREADS": str(max(1, int(lc.num_cpus_per_rank)))}
        if not lc.num_gpus_per_rank:
            env["DS_ACCELERATOR"] = "cpu"
        self.workers = [LearnerWorker.options(**options[r], runtime_env={"env_vars": env}).remote(r, ws, **args)
                        for r in range(ws)]
        infos = ray.get([w.node_info.remote() for w in self.workers])
        master_ip, master_port = infos[0][0], infos[0][1]
        ips = [ip for ip, _, _ in infos]
        local = [ips[:r].count(ips[r]) for r in range(ws)]
        self.info = ray.get([w.setup.remote(master_ip, master_port, local[r], ips.count(ips[r]), infos[r][2])
                             for r, w in enumerate(self.workers)])

    def _submit(self, method: str, *args) -> list:
        """One call per rank, submitted under a lock: calls from several driver threads (a train step and a
        weight resync) then reach every rank in the same order, as ZeRO's collectives need."""
        with self._order:
            return [getattr(w, method).remote(*args) for w in self.workers]

    def _all(self, method: str, *args):
        return ray.get(self._submit(method, *args))

    def train_step(self, role: str, experiences: list[Experience], lam: float = 0.0,
                   objective: str = "rl", restart_optimizer: bool = False) -> dict[str, float]:
        """One optimizer step of `role` on this global batch (`restart_optimizer`: from a fresh optimizer and
        warm-up); returns loss terms, grad norm, tokens/s, timing."""
        ref = ray.put(list(experiences))
        return self._all("train_step", role, ref, lam, objective, restart_optimizer)[0]

    def export_hf(self, role: str, path: str | os.PathLike) -> None:
        """The role's current weights as a Hugging Face folder at `path` (written by rank 0)."""
        self._all("export_hf", role, str(path))

    def activate(self, role: str) -> None:
        self._all("activate", role)

    def version(self, role: str) -> int:
        return self._all("version", role)[0]

    def trained_groups(self, role: str) -> list[str]:
        """Every group id the role's steps trained on, in order (restored with a checkpoint): what the
        driver's ledger is checked against."""
        return self._all("trained_groups", role)[0]

    def weights(self, role: str, transport: str | None = None, form: str = "full"):
        """The role's current weights as a versioned bundle (`named_tensors()`, `version`, `nbytes`); with
        the collective transport, broadcast to the role's group (its members receive concurrently) and a
        receipt comes back. `form` "adapter": only the LoRA matrices (engines that serve LoRA)."""
        return self._all("publish", role, transport, form)[0]

    def open_sync_group(self, role: str, world: int, generation: int, transport: str | None = None) -> dict:
        """A new generation of the role's group of a pushing transport on rank 0: its rendezvous as a dict."""

        return ray.get(self.workers[0].open_sync_group.remote(role, world, generation, transport))

    def state_dict(self, role: str) -> dict[str, torch.Tensor]:
        return self._all("state_dict", role)[0]

    def save(self, path: str | os.PathLike, driver_state: dict | None = None,
             extra: dict[str, Callable[[Path], object]] | None = None) -> Path:
        """Atomically write a complete checkpoint to `path`: all ranks, then `extra[name](folder)` for other
        state that belongs in it (e.g. the teacher), then the driver state, then the rename. A `step-N`
        folder also prunes its siblings down to the newest `checkpoint.keep`."""

        path = Path(path)
        with checkpoint.atomic_dir(path) as tmp:
            ray.get(self._submit("save", str(tmp)))
            for name, write in (extra or {}).items():
                (tmp / name).mkdir(parents=True, exist_ok=True)
                write(tmp / name)
            versions = {role: self.version(role) for role in self.roles}
            checkpoint.write_json(tmp / checkpoint.LEARNER_STATE,
                                  {"versions": versions, "world_size": self.cfg.learner.world_size,
                                   "zero_stage": self.cfg.learner.zero_stage})
            checkpoint.write_json(tmp / checkpoint.DRIVER_STATE, dict(driver_state or {}))
        if checkpoint.is_step_dir(path):
            checkpoint.prune(path.parent, self.cfg.checkpoint.keep)
        return path

    def checkpoint(self, run_dir: str | os.PathLike, step: int, driver_state: dict | None = None,
                   keep: int | None = None) -> Path:
        """Save `run_dir/checkpoints/step-{step:06d}` (driver state gets `step`) and keep the newest `keep`."""
        path = self.save(checkpoint.checkpoint_dir(run_dir, step), {"step": step, **(driver_state or {})})
        if keep is not None:
            checkpoint.prune(run_dir, keep)
        return path

    def load(self, path: str | os.PathLike) -> dict:
        """Restore weights, optimizer, scheduler, RNG and versions; returns the driver state saved with it."""
        path = Path(path)
        if not checkpoint.is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint")
        saved = checkpoint.read_json(path / checkpoint.LEARNER_STATE)
        if saved.get("world_size", self.cfg.learner.world_size) != self.cfg.learner.world_size:
            raise ValueError(f"{path} was written by {saved['world_size']} learner ranks; this group has "
                             f"{self.cfg.learner.world_size} (ZeRO optimizer shards are per rank)")
        self._all("load", str(path))
        return checkpoint.read_driver_state(path)

    def resume(self, run_dir: str | os.PathLike) -> dict | None:
        """Load the newest complete checkpoint of `run_dir`; None when there is none (a fresh run)."""
        path = checkpoint.latest_checkpoint(run_dir)
        return None if path is None else self.load(path)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([w.close.remote() for w in self.workers], timeout=60)
        except Exception as e:  # a dead rank: its buffers go when the node restarts
            log.warning("learner shutdown: %s", e)
        for w in self.workers:
            ray.kill(w)
        if self.pg is not None:  # the run's placement keeps its bundles for the group rebuilt after a failure
            remove_placement_group(self.pg)
        self.workers = []
