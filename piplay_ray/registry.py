"""Every plug-in point of the system, each a table of names to ``module:attribute`` paths.

A registry never imports what it names: an entry is imported the first time it is asked for, in whatever
process asks (a Ray actor imports its own engine), so reading the names costs nothing and `config.py` takes
its allowed values from here. A config value may also be a ``module:attribute`` path of its own, for a
plug-in that lives outside this package (it must be importable wherever it runs).

| registry | config key | what an entry is |
|---|---|---|
| ENGINES | rollout.engine, teacher.backend | an `engines.base.Engine` subclass with `from_config` |
| RETRIEVERS | search.retriever | a `retrieval.base.Retriever` subclass with `from_config` and `build_index` |
| TRANSPORTS | weight_sync.transport | a `weight_sync.base.Transport` subclass |
| ARMS | teacher.privileged | a `method.privileged.Arm`: what the teacher is told |
| REWARDS | student.reward | `reward(prediction, golden) -> float`, the student's outcome reward |
"""

from __future__ import annotations

import importlib
from typing import Any


class Registry:
    """Names to import paths for one config key; `load(name)` imports and returns the entry."""

    def __init__(self, key: str, entries: dict[str, str]):
        self.key = key
        self._entries = dict(entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def register(self, name: str, target: str) -> None:
        """Add `name` -> ``module:attribute`` in this process (a plug-in that other processes name by path)."""
        if ":" not in target:
            raise ValueError(f"{self.key}: a registry entry is a `module:attribute` path, got {target!r}")
        self._entries[name] = target

    def check(self, value: str) -> str:
        """`value` when it is a registered name or an importable ``module:attribute``; else a ValueError that
        names the key and the allowed values (the config's message)."""
        if value in self._entries:
            return value
        if ":" in value:
            try:
                self.load(value)
            except (ImportError, AttributeError, ValueError) as e:
                raise ValueError(f"cannot import the plug-in {value!r}: {e}") from None
            return value
        raise ValueError(f"got {value!r}; allowed values: {', '.join(self._entries)} (or a plug-in as "
                         "module:attribute)")

    def load(self, value: str) -> Any:
        target = self._entries.get(value, value)
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"{self.key}: got {value!r}; allowed values: {', '.join(self._entries)}")
        return getattr(importlib.import_module(module), attr)


ENGINES = Registry("rollout.engine", {
    "vllm": "piplay_ray.engines.vllm_engine:VLLMEngine",
    "transformers": "piplay_ray.engines.transformers_engine:TransformersEngine",
})
RETRIEVERS = Registry("search.retriever", {
    "bm25": "piplay_ray.retrieval.bm25:BM25Retriever",
    "dense": "piplay_ray.retrieval.dense:DenseRetriever",
    "http": "piplay_ray.retrieval.http:HttpRetriever",
})
TRANSPORTS = Registry("weight_sync.transport", {
    "object_store": "piplay_ray.weight_sync.object_store:ObjectStoreTransport",
    "collective": "piplay_ray.weight_sync.collective:CollectiveTransport",
    "ipc": "piplay_ray.weight_sync.ipc:IpcTransport",
})
ARMS = Registry("teacher.privileged", {
    "qcp": "piplay_ray.method.privileged:QCP",
    "partial_qcp": "piplay_ray.method.privileged:PARTIAL_QCP",
    "answer": "piplay_ray.method.privileged:ANSWER",
    "none": "piplay_ray.method.privileged:NONE",
})
REWARDS = Registry("student.reward", {
    "exact_match": "piplay_ray.method.rewards:exact_match",
    "f1": "piplay_ray.method.rewards:f1",
})
