"""The persistent storage a config needs on the shared volume, next to what deploy/kuberay/storage.yaml claims.

A checkpoint (learner `save` and the teacher's `save`) holds, per trained role, the Hugging Face export in the
training dtype and DeepSpeed's state: the training-dtype weights plus float32 master weights and two Adam
moments (12 bytes per parameter); and the teacher's float32 EMA. `checkpoint.keep` of them are kept, and
`keep + 1` exist while the newest is written (the oldest goes only once it is complete); then one more float32 EMA: the snapshot the teacher client restores a restarted teacher from. Beside
the runs the volume holds the retriever's corpus and flat index (passages x dimension x 4 bytes) and the base
model in the Hugging Face cache. Where the corpus file is not at hand, its size is estimated per passage.
"""

from __future__ import annotations

from pathlib import Path

from piplay_ray.cluster.host_memory import GiB, param_count, parse_size, training_bytes
from piplay_ray.config import Config

OPTIMIZER_BYTES = 12  # float32 master weights, Adam's two moments
# Search-R1's wiki-18 corpus and the e5-base-v2 index the cluster retriever serves
KNOWN_CORPORA = {"wiki-18.jsonl": 21_015_324}
BYTES_PER_PASSAGE = 700  # a ~100-word passage with its title and JSON keys
INDEX_DIM = 768


def checkpoint_bytes(cfg: Config, params: float) -> float:
    """One checkpoint of both trained roles and the teacher's EMA."""
    w = training_bytes(cfg)
    return params * (2 * (w + w + OPTIMIZER_BYTES) + 4)


def corpus_bytes(corpus: str) -> tuple[float, float]:
    """(corpus file bytes, flat index bytes) for the retriever's corpus."""
    path = Path(corpus)
    passages = KNOWN_CORPORA.get(path.name)
    if path.is_file():
        size = float(path.stat().st_size)
        passages = passages or size / BYTES_PER_PASSAGE
    else:
        size = (passages or 0) * BYTES_PER_PASSAGE
    return size, (passages or 0) * INDEX_DIM * 4


def need(cfg: Config, params: float) -> dict[str, float]:
    """Bytes on the shared volume for one run of `cfg`, by what holds them; `total` is their sum."""
    corpus, index = corpus_bytes(cfg.search.corpus)
    peak = cfg.checkpoint.keep + 1  # the newest is written before the oldest is pruned
    parts = {"checkpoints": peak * checkpoint_bytes(cfg, params), "teacher_snapshot": params * 4,
             "base_model": params * 2, "corpus": corpus, "index": index}
    parts["total"] = sum(parts.values())
    return parts


def claimed(root: Path | None = None) -> float | None:
    """The shared volume's size as deploy/kuberay/storage.yaml requests it."""
    import yaml

    root = root or Path(__file__).resolve().parents[2]
    for doc in yaml.safe_load_all((root / "deploy" / "kuberay" / "storage.yaml").read_text()):
        if doc and doc.get("kind") == "PersistentVolumeClaim":
            return parse_size(doc["spec"]["resources"]["requests"]["storage"])
    return None


def report(cfg: Config) -> dict:
    """What `python -m piplay_ray.cluster.layout` prints under `storage` (GiB)."""
    params = param_count(cfg)
    parts = None if params is None else {k: round(v / GiB, 1) for k, v in need(cfg, params).items()}
    volume = claimed()
    return {"need_gib": parts, "volume_gib": None if volume is None else round(volume / GiB, 1)}
