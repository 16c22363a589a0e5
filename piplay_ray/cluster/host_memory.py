"""The host shared memory (/dev/shm) a config needs per node, next to what its KubeRay manifests give.

Ray's object store lives in /dev/shm. With `weight_sync.transport=object_store` it holds each role's latest
weight bundle (training dtype) and every vLLM receiver writes one more file of the same size while it
reloads; with `collective` no weights pass through host shared memory at all (the teacher's EMA snapshot for
restart recovery is a file in the run's folder, `storage.py`). The estimate is an upper bound per node
(a node may hold all of it) plus a fixed headroom for experiences, NCCL and vLLM's own segments.
"""

from __future__ import annotations

from pathlib import Path

from piplay_ray import assets
from piplay_ray.cluster.shapes import ARCHS
from piplay_ray.config import Config
from piplay_ray.weight_sync import transport_class

GiB = 1 << 30
HEADROOM = 4 * GiB


def param_count(cfg: Config) -> float | None:
    """Parameters of the trained model: from the shapes `shapes.ARCHS` knows (layouts computed where the
    model's files are not at hand), else from its files when they resolve locally."""
    name = cfg.model.path_for("student")
    if name in ARCHS:
        return ARCHS[name].params
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = AutoConfig.from_pretrained(assets.resolve_model(name), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
        return float(sum(p.numel() for p in model.parameters()))
    except Exception:
        return None


def training_bytes(cfg: Config) -> int:
    """Bytes per parameter of the learner's weights (what every transport sends)."""
    if cfg.learner.num_gpus_per_rank > 0 and cfg.learner.bf16 in ("auto", True):
        return 2
    return 2 if cfg.learner.bf16 is True else 4


def shared_memory(cfg: Config, params: float) -> dict[str, float]:
    """Bytes of /dev/shm per node, by what holds them; `total` is their sum."""
    w = params * training_bytes(cfg)
    parts = {"headroom": float(HEADROOM)}
    if transport_class(cfg.weight_sync.transport).in_shared_memory:
        parts["weight_bundles"] = 2 * w  # the latest bundle of each role
        if cfg.rollout.engine == "vllm":
            parts["vllm_reload_files"] = cfg.rollout.workers_per_role * w  # a role's engines reload together
    parts["total"] = sum(parts.values())
    return parts


def parse_size(text: str | int | None) -> float | None:
    if text is None:
        return None
    text = str(text)
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": GiB, "Ti": 1 << 40}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * mult
    return float(text)


def manifest_memory(config_path: str | Path, root: Path | None = None) -> dict[str, dict[str, float | None]]:
    """Per KubeRay manifest made for this config and per group: object store bytes and /dev/shm size."""
    import yaml

    root = root or Path(__file__).resolve().parents[2]
    rel = Path(config_path).resolve()
    rel = rel.relative_to(root) if rel.is_relative_to(root) else Path(config_path)
    out: dict[str, dict[str, float | None]] = {}
    for path in sorted((root / "deploy" / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or (doc.get("metadata", {}).get("annotations") or {}).get("piplay-ray/config") != str(rel):
                continue
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
            for name, group in groups:
                shm = next((v.get("emptyDir", {}).get("sizeLimit") for v in group["template"]["spec"]["volumes"]
                            if v["name"] == "dshm"), None)
                out[f"{path.name}:{name}"] = {"object_store": parse_size(group["rayStartParams"].get("object-store-memory")),
                                              "dev_shm": parse_size(shm)}
    return out


def report(cfg: Config, config_path: str | Path) -> dict:
    """What `python -m piplay_ray.cluster.layout` prints under `shared_memory` (GiB)."""
    params = param_count(cfg)
    need = None if params is None else {k: round(v / GiB, 2) for k, v in shared_memory(cfg, params).items()}
    given = {k: {kk: None if vv is None else round(vv / GiB, 2) for kk, vv in v.items()}
             for k, v in manifest_memory(config_path).items()}
    return {"params": params, "need_gib_per_node": need, "manifests_gib": given}
