"""Shared fixtures. Assets live in the piplay home ($PIPLAY_HOME or ~/.cache/piplay), built on first use."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray workers import the test plug-ins (helpers/plugins.py) by path, as a user's own package would be imported
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def corpus_path() -> str:
    from piplay_ray import assets

    return str(assets.corpus_path())


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The tiny Llama with its corpus-trained tokenizer and chat template (cached across sessions)."""
    from piplay_ray import assets

    return str(assets.tiny_path())


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The embedded SmolLM2-135M-Instruct (slow tests only; `make assets` builds it)."""
    from piplay_ray import assets

    return str(assets.smollm2_path())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model, corpus_path) -> SimpleNamespace:
    """One real run of configs/tiny.yaml shared by test_train_tiny and test_train_collective (a tiny run costs
    minutes on two cores): vLLM CPU rollouts with two workers per role, weights synced by the collective
    transport (gloo), DeepSpeed CPU learner, BM25 search env, transformers teacher, Ray actors. The driver runs
    in-process (`driver.train`, what `piplay train` calls; tests/helpers/inprocess.py) so that a thread can kill a
    student rollout worker once its pool holds version 1: it must rejoin on a new generation and the run
    complete. `piplay train` as a subprocess runs in test_fault_driver and test_experiment.

    Yields dir (the run directory), loop (the finished loop) and killed (the sync generation at the kill)."""
    import time

    import ray
    from helpers.inprocess import train_watched

    from piplay_ray.config import load_config

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      [f"run.dir={run_dir}", "checkpoint.every=1", "checkpoint.keep=3",
                       "weight_sync.transport=collective", "rollout.workers_per_role=2",
                       "weight_sync.timeout_s=300", "ray.num_cpus=8"])
    killed = []

    def kill_between_syncs(loop, stop):
        while not stop.is_set() and loop.policies["student"].pool_version < 1:
            time.sleep(0.05)
        if not stop.is_set():
            killed.append(loop.actors.syncs["student"].generation)
            ray.kill(loop.actors.pools["student"].workers[0], no_restart=False)

    loop = train_watched(cfg, kill_between_syncs)
    return SimpleNamespace(dir=run_dir, loop=loop, killed=killed)


@pytest.fixture(scope="module")
def agent_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model trained to search (helpers/rollout.py), built once per module that asks."""
    from helpers.rollout import train_agent_model

    return train_agent_model(tiny_model, tmp_path_factory.mktemp("agent-model"))


@pytest.fixture(scope="module")
def ray_local(request):
    """The one local Ray of a test module, with the module's `RAY_CPUS` (default 2) CPUs; shut down after the
    module, so every module starts from a clean cluster. Workers inherit this process's environment."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=getattr(request.module, "RAY_CPUS", 2), include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
