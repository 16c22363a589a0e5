"""Each registry against the config that reads it: every entry loads as what its table says, and the config
accepts exactly the registered names (plus a plug-in's `module:attribute`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from piplay_ray.config import ConfigError, load_config
from piplay_ray.engines.base import Engine
from piplay_ray.method.privileged import Arm
from piplay_ray.registry import ARMS, ENGINES, RETRIEVERS, REWARDS, TRANSPORTS
from piplay_ray.retrieval.base import Retriever
from piplay_ray.weight_sync.base import Transport

KINDS = {ENGINES: Engine, RETRIEVERS: Retriever, TRANSPORTS: Transport}
REGISTRIES = [ENGINES, RETRIEVERS, TRANSPORTS, ARMS, REWARDS]


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.key)
def test_every_entry_loads_as_its_kind(registry):
    assert registry.names()
    for name in registry.names():
        entry = registry.load(name)
        if registry in KINDS:
            assert isinstance(entry, type) and issubclass(entry, KINDS[registry]), name
        elif registry is ARMS:
            assert isinstance(entry, Arm) and entry.name == name
        else:
            assert entry("Paris", ["Paris"]) == 1.0 and entry("Lyon", ["Paris"]) == 0.0
    if registry in (ENGINES, RETRIEVERS):  # what make_engine / make_retriever call
        base = KINDS[registry].__dict__.get("from_config")
        assert all(registry.load(n).__dict__.get("from_config") not in (None, base) for n in registry.names())
    if registry is TRANSPORTS:
        assert all(registry.load(n).name == n for n in registry.names())


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.key)
def test_the_config_accepts_exactly_the_registered_names(registry):
    section, key = registry.key.split(".")
    for name in registry.names():
        assert getattr(getattr(load_config(None, [f"{registry.key}={name}"]), section), key) == name
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{registry.key}=no_such_thing"])
    assert f"`{registry.key}`: got 'no_such_thing'; allowed values: {', '.join(registry.names())}" in str(e.value)


def test_the_teacher_backend_is_an_engine_or_shared():
    assert load_config(None, ["teacher.backend=transformers"]).teacher.backend == "transformers"
    with pytest.raises(ConfigError, match=f"allowed values: {', '.join(ENGINES.names())}, shared"):
        load_config(None, ["teacher.backend=remote"])


def test_a_plug_in_path_must_import():
    with pytest.raises(ConfigError, match="cannot import the plug-in 'no_such_module:Thing'"):
        load_config(None, ["rollout.engine=no_such_module:Thing"])
    with pytest.raises(ValueError, match="module:attribute"):
        ARMS.register("bad", "no colon")


def test_reading_the_config_imports_no_implementation():
    """The registries name their entries by path: config and registry import none of them."""
    code = ("import sys; import piplay_ray.config, piplay_ray.registry; "
            "print([m for m in sys.modules if m.startswith(('vllm', 'torch', 'bm25s', 'faiss', 'ray'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
