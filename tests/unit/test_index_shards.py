"""The flat dense index built in shards: FAISS's own file format, resume after a kill, and the service's wait."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.runs import ROOT

from piplay_ray.retrieval.corpus import Corpus
from piplay_ray.retrieval.shards import build_flat_sharded, write_flat_ip


def test_joined_shards_are_the_bytes_faiss_writes(tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 12)).astype(np.float32) for n in (5, 7, 1)]
    for i, p in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", p)
    assert write_flat_ip([tmp_path / f"{i}.npy" for i in range(3)], 12, tmp_path / "ours.faiss") == 13
    index = faiss.IndexFlatIP(12)
    index.add(np.concatenate(parts))
    faiss.write_index(index, str(tmp_path / "faiss.faiss"))
    assert (tmp_path / "ours.faiss").read_bytes() == (tmp_path / "faiss.faiss").read_bytes()
    loaded = faiss.read_index(str(tmp_path / "ours.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    assert loaded.ntotal == 13 and loaded.search(parts[1][:1], 1)[1][0, 0] in range(13)


@pytest.fixture(scope="module")
def encoder():
    from piplay_ray.retrieval.dense import load_encoder

    return load_encoder("builtin:minilm", "cpu")


def _corpus(src: str, n: int, path: Path) -> Corpus:
    full = Corpus(src)
    path.write_text("".join(json.dumps(full.raw(i), ensure_ascii=False) + "\n" for i in range(n)), encoding="utf-8")
    return Corpus(path)


@pytest.mark.parametrize("docs", [24, 20])  # a short last shard, and shards that divide the corpus
def test_a_build_killed_mid_way_resumes_to_the_same_index(corpus_path, encoder, tmp_path, docs):
    from piplay_ray.retrieval.dense import encode

    corpus = _corpus(corpus_path, docs, tmp_path / "c.jsonl")
    calls: list[int] = []

    def real(texts):
        calls.append(len(texts))
        return encode(encoder, texts)

    def dies_on_the_second_shard(texts):
        if calls:
            raise KeyboardInterrupt("killed")
        return real(texts)

    params = {"encoder": "minilm"}
    whole = build_flat_sharded(corpus, tmp_path / "a" / "idx", real, params, shard_docs=10)
    assert calls == [10, 10] + ([4] if docs == 24 else [])
    calls.clear()
    dest = tmp_path / "b" / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_flat_sharded(corpus, dest, dies_on_the_second_shard, params, shard_docs=10)
    partial = dest.parent / ".idx.partial"
    assert not dest.exists() and len(list((partial / "shards").glob("*.npy"))) == 1
    calls.clear()
    assert build_flat_sharded(corpus, dest, real, params, shard_docs=10) == dest
    assert calls == [10] + ([4] if docs == 24 else [])  # only the shards the kill lost
    assert (dest / "index.faiss").read_bytes() == (whole / "index.faiss").read_bytes()
    assert json.loads((dest / "DONE").read_text()) == params and not partial.exists()
    calls.clear()
    build_flat_sharded(corpus, dest, real, params, shard_docs=10)
    assert calls == []  # complete: nothing is encoded again


def test_a_partial_build_with_other_params_starts_over(corpus_path, tmp_path):
    corpus = _corpus(corpus_path, 30, tmp_path / "c.jsonl")
    dest = tmp_path / "idx"

    def first(texts):
        if first.done:
            raise KeyboardInterrupt
        first.done = True
        return np.ones((len(texts), 4), np.float32)

    first.done = False
    with pytest.raises(KeyboardInterrupt):
        build_flat_sharded(corpus, dest, first, {"encoder": "a"}, shard_docs=10)
    seen = []
    build_flat_sharded(corpus, dest, lambda t: seen.append(len(t)) or np.zeros((len(t), 4), np.float32),
                       {"encoder": "b"}, shard_docs=10)
    assert seen == [10, 10, 10]  # the encoder-a shard was not reused


def _wait_command() -> str:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/retriever.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    init = next(c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "wait-for-index")
    return init["command"][-1]


def test_the_service_waits_for_a_complete_index_not_a_started_one(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs/cluster/retriever-e5.yaml").read_text())
    root = cfg["search"]["index_dir"]
    cmd = _wait_command().replace(root, str(tmp_path)).replace("sleep 60", "exit 3")
    assert root in _wait_command()

    def ready() -> bool:
        return subprocess.run(["bash", "-c", cmd], timeout=10).returncode == 0

    assert not ready()
    (tmp_path / ".wiki-18-dense-abc.partial" / "shards").mkdir(parents=True)  # a build under way
    (tmp_path / ".wiki-18-dense-abc.partial" / "shards" / "000000.npy").write_bytes(b"x")
    assert not ready()
    (tmp_path / "wiki-18-dense-abc").mkdir()
    (tmp_path / "wiki-18-dense-abc" / "index.faiss").write_bytes(b"x")
    assert not ready()
    (tmp_path / "wiki-18-dense-abc" / "DONE").write_text("{}")
    assert ready()
