"""The retriever interface: batched search over a corpus."""

from __future__ import annotations

import abc

from piplay_ray.records import Doc


class Retriever(abc.ABC):
    @abc.abstractmethod
    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        """One list of up to `topk` documents per query, best first, in the order of `queries`."""


class RetrievalError(RuntimeError):
    """A retriever could not answer (e.g. its server stayed unreachable after the configured retries)."""
