"""The loop's actors: what `start_actors` launches on Ray, handed to the loop through its constructor.

Tests hand the loop fakes (or keep a reference to the real actors) the same way; nothing in the loop starts
an actor itself except through the two factories kept here, which a learner failure calls to rebuild the
learner group and a fresh replay store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from piplay_ray import assets
from piplay_ray.actors.replay import ReplayStore
from piplay_ray.actors.rollout_pool import RolloutPool
from piplay_ray.actors.search_env import SearchEnvPool
from piplay_ray.cluster.layout import layout, sync_transport
from piplay_ray.cluster.placement import Placement
from piplay_ray.config import Config
from piplay_ray.learner.checkpoint import latest_checkpoint
from piplay_ray.learner.learner import LearnerGroup
from piplay_ray.roles import MODELS, TRAINED
from piplay_ray.rundir import TEACHER_SNAPSHOT
from piplay_ray.teacher import TeacherHandle
from piplay_ray.teacher.actor import create_teacher
from piplay_ray.teacher.client import TeacherClient
from piplay_ray.teacher.shared import SharedTeacher
from piplay_ray.weight_sync import transport_class
from piplay_ray.weight_sync.coordinator import GroupSync

log = logging.getLogger(__name__)


@dataclass
class Actors:
    search: object  # SearchEnvPool
    pools: dict[str, object]  # role -> RolloutPool
    teacher: object  # the Teacher actor; None with teacher.backend=shared
    teacher_client: TeacherHandle  # TeacherClient on `teacher`, or the SharedTeacher on the student's engines
    learner: object  # LearnerGroup
    replay: object  # ReplayStore actor
    syncs: dict[str, object] | None = None  # role -> GroupSync with a pushing transport (collective, ipc)
    new_learner: Callable[[], object] | None = None
    new_replay: Callable[[str | None], object] | None = None  # from a spill file, or empty

    def named(self) -> dict[str, object]:
        """Every actor by its name in health.json and the accounting."""
        named = {f"search-{i}": a for i, a in enumerate(self.search.actors)}
        for role, pool in self.pools.items():
            named |= {f"rollout-{role}-{i}": w for i, w in enumerate(pool.workers)}
        named |= {f"learner-{i}": w for i, w in enumerate(self.learner.workers)}
        return named | ({"teacher": self.teacher} if self.teacher is not None else {}) | {"replay": self.replay}

    async def sleep(self, *names: str) -> None:
        """The engines of `names` ("teacher", or a role's pool) sleep through a phase that does not use them
        (`rollout.sleep_when_idle`: on a GPU their memory goes to the learner). A hint: their next use wakes
        them, and one that fails to sleep is logged, never fatal."""
        workers = [w for n in names for w in ([self.teacher] if n == "teacher" else self.pools[n].workers)
                   if w is not None]
        for out in await asyncio.gather(*[w.asleep.remote() for w in workers], return_exceptions=True):
            if isinstance(out, BaseException):
                log.warning("an idle engine did not sleep: %s", out)


def model_paths(cfg: Config) -> dict[str, str]:
    return {r: assets.resolve_model(cfg.model.path_for(r)) for r in MODELS}


def start_actors(cfg: Config, run_path: Path) -> Actors:
    """Search env, a rollout pool per trained role, the teacher (none with teacher.backend=shared: an adapter on
    the student's engines), the learner group and the replay store. The teacher client falls back on the
    newest checkpoint's teacher under `run_path`."""
    paths = model_paths(cfg)
    lay = layout(cfg)
    # every GPU actor's bundle where the plan puts it, the learner's node first, before any actor starts; the
    # engines then load while the learner's ranks set up
    placement = Placement(lay) if lay.slots else None
    search = SearchEnvPool(cfg.search, fault=cfg.fault)
    pools = {r: RolloutPool.from_config(r, paths[r], cfg, search, placement=placement) for r in TRAINED}
    teacher = None if cfg.teacher.backend == "shared" else create_teacher(paths["teacher"], cfg, placement)

    def teacher_fallback() -> Path | None:
        ckpt = latest_checkpoint(run_path)
        return None if ckpt is None else ckpt / "teacher"

    if teacher is None:
        client = SharedTeacher.from_config(pools["student"], paths["student"], cfg)
    else:
        client = TeacherClient(teacher, cfg.fault.max_task_retries, teacher_fallback,
                               form="adapter" if cfg.learner.lora.rank else "full",
                               snapshot_dir=run_path / TEACHER_SNAPSHOT)
    learner = LearnerGroup(cfg, TRAINED, placement)
    syncs, kind = None, sync_transport(cfg, lay)
    if transport_class(kind).pushes:  # one group per role; the student's holds the teacher
        syncs = {r: GroupSync(r, learner, pools[r], teacher if r == "student" else None, cfg.fault.max_task_retries,
                              kind) for r in TRAINED}

    def new_replay(spill: str | None = None):
        return ReplayStore.remote(cfg.replay.capacity_groups, cfg.replay.max_staleness, spill)

    return Actors(search, pools, teacher, client, learner, new_replay(), syncs,
                  new_learner=lambda: LearnerGroup(cfg, TRAINED, placement), new_replay=new_replay)
