"""The retriever interface: batched search over a corpus."""

from __future__ import annotations

import abc
from pathlib import Path

from piplay_ray.records import Doc


class Retriever(abc.ABC):
    """One implementation per file, named in `registry.RETRIEVERS`."""

    @classmethod
    def from_config(cls, cfg, show_progress: bool = False) -> Retriever:
        """The retriever a `search` config section describes (its index built on first use); every registered
        retriever has one (tests/unit/test_registries.py)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config")

    @classmethod
    def build_index(cls, cfg) -> Path | None:
        """Build (or find) the index `cfg` names, with a progress bar; its folder, None when there is none."""
        return None

    @abc.abstractmethod
    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        """One list of up to `topk` documents per query, best first, in the order of `queries`."""


class RetrievalError(RuntimeError):
    """A retriever could not answer (e.g. its server stayed unreachable after the configured retries)."""
