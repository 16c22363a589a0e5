"""`piplay train --config F [-v] [overrides...]`: the run around the evolution loop — Ray, the warm start, the
actors, the dashboard, signals, the run summary. The loop itself (paper Algorithm 1) is
:mod:`piplay_ray.evolution.loop`."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import ray
import yaml

from piplay_ray import assets
from piplay_ray.cluster.resources import check_cluster
from piplay_ray.config import Config, load_config
from piplay_ray.errors import UserInputError
from piplay_ray.evolution import warmup
from piplay_ray.evolution.actors import start_actors
from piplay_ray.evolution.loop import EvolutionLoop
from piplay_ray.learner import checkpoint
from piplay_ray.monitor import console, summary
from piplay_ray.monitor.console import say
from piplay_ray.monitor.dashboard.server import start_dashboard
from piplay_ray.retrieval.corpus import Corpus
from piplay_ray.rundir import CONFIG, RunDir, run_path


def run(args) -> int:
    train(load_config(args.config, [*args.overrides, *(["logging.verbose=true"] if args.verbose else [])]))
    return 0


def start_loop(cfg: Config, run: RunDir) -> EvolutionLoop:
    """The loop on freshly started actors (what `train` runs unless handed another `make_loop`)."""
    say("starting actors: search env, rollout pools, teacher, learner, replay store")
    return EvolutionLoop(cfg, run, start_actors(cfg, run.path))


def init_ray(cfg: Config, run_dir: Path) -> None:
    if ray.is_initialized():
        return
    verbose = cfg.logging.verbose
    console.quiet_driver(verbose)
    if cfg.run.mode == "cluster":
        # a submitted job already carries its runtime env (`piplay submit`); actor output stays in Ray's logs
        ray.init(address=cfg.ray.address or os.environ.get("RAY_ADDRESS", "auto"), namespace=cfg.ray.namespace,
                 log_to_driver=verbose)
    else:
        opts = console.ray_init_options(run_dir, verbose)
        opts["runtime_env"]["env_vars"].update({k: v for k in ("PIPLAY_HOME", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE")
                                                if (v := os.environ.get(k))})
        ray.init(num_cpus=cfg.ray.num_cpus, namespace=cfg.ray.namespace, include_dashboard=False, **opts)
        if not verbose:
            say(console.where(run_dir))


# sections a resumed run may change: where and how it runs, not what it trains (run.seed is what it trains)
RESUMABLE_CHANGES = ("run", "logging", "dashboard", "ray", "fault")
FIXED_ON_RESUME = ("run.seed",)


def check_resume(cfg: Config, run_path: Path) -> None:
    """Before any actor starts: a finished run is refused, and so is resuming with a config that changes what
    is trained (the diff is named; `run.accept_changed_config=true` resumes anyway)."""
    ckpt = checkpoint.latest_checkpoint(run_path) if cfg.run.resume else None
    if ckpt is None:
        return
    state = checkpoint.read_driver_state(ckpt)
    if state.get("phase") == "done":
        raise SystemExit(f"piplay: the run in {run_path} is already complete ({state.get('global_step')} steps); "
                         "set run.dir to a new folder (or run.resume=false) to start another")
    saved_path = run_path / CONFIG
    if cfg.run.accept_changed_config or not saved_path.is_file():
        return
    saved, now = _flat(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}), _flat(cfg.model_dump(mode="json"))
    changed = [k for k in sorted(saved.keys() | now.keys())
               if saved.get(k) != now.get(k) and (k.split(".")[0] not in RESUMABLE_CHANGES or k in FIXED_ON_RESUME)]
    if changed:
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise UserInputError(f"{run_path} was started with another config ({diff}{' ...' if len(changed) > 8 else ''}); "
                             f"resuming would mix two runs. Resume with its {saved_path}, set run.dir to a new "
                             "folder, or set run.accept_changed_config=true")


def _flat(d: dict, head: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{head}{k}.") if isinstance(v, dict) else {f"{head}{k}": v})
    return out


def train(cfg: Config, make_loop: Callable[[Config, RunDir], EvolutionLoop] = start_loop) -> Path:
    """Run (or resume) the evolution loop for `cfg`; returns the run directory. `make_loop` builds the loop
    once Ray is up (tests hand in one that keeps a reference to it)."""
    check_resume(cfg, run_path(cfg))
    Corpus(assets.resolve_corpus(cfg.search.corpus)).validate()  # a bad row named now, not inside an actor
    run = RunDir.create(cfg)  # locked for this driver until the run ends, however it ends
    try:
        return _run(cfg, run, make_loop)
    finally:
        run.unlock()


def _run(cfg: Config, run: RunDir, make_loop: Callable[[Config, RunDir], EvolutionLoop]) -> Path:
    say(f"run directory: {console.shown(run.path)}")
    init_ray(cfg, run.path)
    check_cluster(cfg)  # too few CPUs/GPUs: fail now, naming them, not at a placement-group timeout
    cfg = warmup.prepare(cfg)  # a warm start named by the config: built once, then cached
    loop = make_loop(cfg, run)
    stop_dashboard = None
    if cfg.dashboard.enabled:
        url, stop_dashboard = start_dashboard(run.path, cfg.dashboard.host, cfg.dashboard.port)
        say(f"dashboard: {url}")
    resumed = loop.book.resume()
    if not resumed:
        loop.publish_all()
    previous = {s: signal.signal(s, loop.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(loop.run_resilient())
    except Exception:
        if not cfg.logging.verbose:
            say(f"the run failed; {console.where(run.path)}")
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        loop.metrics.close()
        if stop_dashboard:
            stop_dashboard()
        if cfg.run.mode == "local":
            ray.shutdown()
    if loop.state.phase == "done":
        say("run summary (summary.json):\n  " + "\n  ".join(summary.lines(summary.write(run.path))))
    say(f"done: {loop.state.global_step} learner steps; run directory {console.shown(run.path)}")
    return run.path
