"""Shared fixtures. Assets live in the piplay home ($PIPLAY_HOME or ~/.cache/piplay), built on first use."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
