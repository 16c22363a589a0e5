"""`make gpu-check`: the whole loop on configs/tiny.yaml on one GPU, the way a cluster runs it.

vLLM on CUDA for both rollout pools and the teacher, a ZeRO-3 learner, weight sync over the collective
transport (gloo over the GPU's tensors: NCCL refuses two ranks on one device) and fractional GPUs so every
actor shares the one device.
Exits non-zero on any failure, and first of all when there is no CUDA GPU (this check cannot run on CPU);
on success prints one JSON line: learner step seconds, sync seconds and sync GB/s (means over the run).
`--engine transformers` runs the same loop with the transformers engine for rollouts and teacher, for a GPU
machine where vLLM for CUDA cannot be installed (Ray, DeepSpeed and the sync are the same).

    python bench/gpu_check.py [--timeout 1800] [--engine vllm|transformers] [extra section.key=value ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "rollout.num_gpus_per_worker=0.2", "rollout.gpu_memory_utilization=0.15",
    "rollout.enforce_eager=false", "teacher.num_gpus=0.2",
    "teacher.gpu_memory_utilization=0.15", "learner.num_gpus_per_rank=0.2", "learner.zero_stage=3",
    # every member shares the one GPU, and NCCL refuses two ranks on one device ("Duplicate GPU detected",
    # seen on an H200): gloo carries the CUDA tensors here; a cluster keeps the NCCL default
    "weight_sync.transport=collective", "weight_sync.backend=gloo", "weight_sync.timeout_s=300", "model.dtype=bfloat16",
    "checkpoint.every=2", "ray.num_cpus=8",
]


def fail(msg: str, code: int = 1) -> int:
    print(json.dumps({"bench": "gpu_check", "ok": False, "error": msg}))
    return code


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def main(argv: list[str]) -> int:
    timeout, engine = 1800, "vllm"
    while argv[:1] in (["--timeout"], ["--engine"]):
        if argv[0] == "--timeout":
            timeout = int(argv[1])
        else:
            engine = argv[1]
        argv = argv[2:]
    if engine not in ("vllm", "transformers"):
        return fail(f"--engine must be vllm or transformers, got {engine!r}", 2)
    import torch

    if not torch.cuda.is_available():
        return fail("no CUDA GPU visible: gpu-check runs on a machine with a GPU and the `gpu` extra "
                    "(pip install -e '.[gpu]'); nothing was run", 2)
    run_dir = Path(tempfile.mkdtemp(prefix="piplay-gpu-check-")) / "run"
    cmd = [sys.executable, "-m", "piplay_ray", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"run.dir={run_dir}", *OVERRIDES, f"rollout.engine={engine}", f"teacher.backend={engine}", *argv]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return fail(f"the run did not finish within {timeout} s (run directory {run_dir})")
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-8000:])
        return fail(f"piplay train exited with {proc.returncode} (run directory {run_dir})")
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r["learner/step_seconds"] for r in rows if "learner/step_seconds" in r]
    syncs = [r["weight_sync/seconds"] for r in rows if "weight_sync/seconds" in r]
    rates = [r["weight_sync/gb_per_s"] for r in rows if "weight_sync/gb_per_s" in r]
    if not steps or not syncs:
        return fail(f"the run logged no learner steps or no weight syncs (run directory {run_dir})")
    print(json.dumps({"bench": "gpu_check", "ok": True, "device": torch.cuda.get_device_name(0), "engine": engine,
                      "steps": len(steps), "step_seconds": _mean(steps), "syncs": len(syncs),
                      "sync_seconds": _mean(syncs), "sync_gb_per_s": _mean(rates), "run_dir": str(run_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
