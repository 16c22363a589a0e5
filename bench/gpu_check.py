"""`make gpu-check`: the whole loop on configs/tiny.yaml on one GPU, the way a cluster runs it.

vLLM on CUDA for both rollout pools and the teacher, a ZeRO-3 learner, weight sync over the ipc transport
(CUDA IPC handles: every member shares the one device, where NCCL refuses two ranks) and fractional GPUs so
every actor shares it.
Exits non-zero on any failure, and first of all when there is no CUDA GPU (this check cannot run on CPU);
on success prints one JSON line: learner step seconds, sync seconds and sync GB/s (means over the run).
Before that, on any machine, it prints (to stderr) torch's CUDA, nvcc's release and the driver version, with a
warning when nvcc's CUDA major.minor differs from torch's: DeepSpeed's FusedAdam (`learner.offload_inactive`)
compiles with that nvcc on first use unless it was prebuilt (DS_BUILD_FUSED_ADAM=1, as deploy/Dockerfile does).
`--engine transformers` runs the same loop with the transformers engine for rollouts and teacher, for a GPU
machine where vLLM for CUDA cannot be installed (Ray, DeepSpeed and the sync are the same).

    python bench/gpu_check.py [--timeout 1800] [--engine vllm|transformers] [extra section.key=value ...]
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "rollout.num_gpus_per_worker=0.2", "rollout.gpu_memory_utilization=0.15",
    "rollout.enforce_eager=false", "teacher.num_gpus=0.2",
    "teacher.gpu_memory_utilization=0.15", "learner.num_gpus_per_rank=0.2", "learner.zero_stage=3",
    # every member shares the one GPU, where NCCL refuses two ranks ("Duplicate GPU detected", seen on an
    # H200): a pushing transport on a one-GPU layout runs as ipc (CUDA IPC handles; layout.sync_transport)
    "weight_sync.transport=collective", "weight_sync.timeout_s=300", "model.dtype=bfloat16",
    "checkpoint.every=2", "ray.num_cpus=8",
]


def fail(msg: str, code: int = 1, versions: dict | None = None) -> int:
    print(json.dumps({"bench": "gpu_check", "ok": False, "error": msg, "versions": versions}))
    return code


# ----------------------------------------------------------------------- CUDA versions (pure, unit-tested)


def nvcc_release(text: str) -> str | None:
    """The CUDA major.minor of `nvcc --version` output ("Cuda compilation tools, release 13.0, V13.0.88")."""
    m = re.search(r"\brelease (\d+)\.(\d+)", text)
    return f"{m[1]}.{m[2]}" if m else None


def major_minor(version: str | None) -> tuple[int, int] | None:
    """(13, 0) from "13.0", "13.0.88" or "V13.0"; None from None or anything without a dotted version."""
    m = re.match(r"\s*[vV]?(\d+)\.(\d+)", version or "")
    return (int(m[1]), int(m[2])) if m else None


def driver_version(nvidia_smi_output: str) -> str | None:
    """The first GPU's driver version from `nvidia-smi --query-gpu=driver_version --format=csv,noheader`."""
    lines = [line.strip() for line in nvidia_smi_output.splitlines() if line.strip()]
    return lines[0] if lines and re.fullmatch(r"\d+(\.\d+)+", lines[0]) else None


def cuda_mismatch(torch_cuda: str | None, nvcc: str | None) -> str | None:
    """A warning naming both versions when nvcc's CUDA major.minor is not torch's; None when they agree or
    either is unknown (a CPU build of torch, no nvcc)."""
    t, n = major_minor(torch_cuda), major_minor(nvcc)
    if t is None or n is None or t == n:
        return None
    return (f"WARNING: nvcc is CUDA {n[0]}.{n[1]} but torch is built for CUDA {t[0]}.{t[1]}: DeepSpeed's JIT build "
            "of FusedAdam (learner.offload_inactive) fails with this nvcc; put an nvcc of torch's CUDA first on PATH "
            "(or CUDA_HOME), or use an image with FusedAdam prebuilt (deploy/Dockerfile)")


def find_nvcc(environ, which=shutil.which, default: str = "/usr/local/cuda/bin/nvcc") -> str | None:
    """The nvcc torch's extension builder (so DeepSpeed's JIT) uses: $CUDA_HOME/bin/nvcc (or $CUDA_PATH's), else
    nvcc on PATH, else CUDA's default place; None when there is none."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(key):
            return str(Path(environ[key]) / "bin" / "nvcc")
    return which("nvcc") or (default if Path(default).is_file() else None)


def fused_adam_prebuilt(installed_info: str) -> bool:
    """Whether DeepSpeed's git_version_info_installed.py (written by its setup.py) records a FusedAdam built for
    CUDA; DeepSpeed loads a prebuilt op only when the accelerator it was built for is the one in use."""
    values = {}
    for name in ("installed_ops", "accelerator_name"):
        m = re.search(rf"^{name}\s*=\s*(.+)$", installed_info, re.M)
        try:
            values[name] = ast.literal_eval(m[1]) if m else None
        except (ValueError, SyntaxError):
            values[name] = None
    return bool((values["installed_ops"] or {}).get("fused_adam")) and values["accelerator_name"] == "cuda"


# -------------------------------------------------------------------------- CUDA versions (this machine)


def _run(cmd: list[str]) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def probe_versions() -> dict:
    """torch's CUDA, nvcc's release, the driver and whether FusedAdam is prebuilt, on this machine."""
    try:
        import torch

        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    driver = driver_version(_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "")
    if driver is None:
        try:  # the NVML bindings DeepSpeed depends on, where nvidia-smi is not on PATH
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:
            driver = None
    prebuilt = None
    spec = importlib.util.find_spec("deepspeed")
    if spec is not None and spec.origin:
        info = Path(spec.origin).parent / "git_version_info_installed.py"
        prebuilt = fused_adam_prebuilt(info.read_text()) if info.is_file() else False
    nvcc = find_nvcc(os.environ)
    release = nvcc_release(_run([nvcc, "--version"]) or "") if nvcc else None
    return {"torch_cuda": torch_cuda, "nvcc": release, "nvcc_path": nvcc if release else None, "driver": driver,
            "fused_adam_prebuilt": prebuilt}


def version_report(v: dict) -> list[str]:
    """The lines gpu-check prints about the CUDA stack, the mismatch warning last."""
    lines = [
        f"torch CUDA: {v['torch_cuda'] or 'none (a CPU build of torch, or no torch)'}",
        (f"nvcc: release {v['nvcc']}" + (f" ({v['nvcc_path']})" if v.get("nvcc_path") else "")
         if v["nvcc"] else "nvcc: not found"),
        f"driver: {v['driver'] or 'no driver'}",
    ]
    if v.get("fused_adam_prebuilt") is not None:
        lines.append("DeepSpeed FusedAdam: " + ("prebuilt for CUDA" if v["fused_adam_prebuilt"]
                                               else "not prebuilt (compiled with nvcc on first use)"))
    warning = cuda_mismatch(v["torch_cuda"], v["nvcc"])
    if warning:
        lines.append(warning + (" (this install has it prebuilt, so only a JIT build is affected)"
                                if v.get("fused_adam_prebuilt") else ""))
    return lines


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
    versions = probe_versions()
    for line in version_report(versions):
        print(f"gpu-check: {line}", file=sys.stderr)
    try:
        import torch
    except ImportError:
        return fail("torch is not installed: gpu-check needs the `gpu` extra (pip install -e '.[gpu]')", 2, versions)
    if not torch.cuda.is_available():
        return fail("no CUDA GPU visible: gpu-check runs on a machine with a GPU and the `gpu` extra "
                    "(pip install -e '.[gpu]'); nothing was run", 2, versions)
    run_dir = Path(tempfile.mkdtemp(prefix="piplay-gpu-check-")) / "run"
    cmd = [sys.executable, "-m", "piplay_ray", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"run.dir={run_dir}", *OVERRIDES, f"rollout.engine={engine}", f"teacher.backend={engine}", *argv]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return fail(f"the run did not finish within {timeout} s (run directory {run_dir})", versions=versions)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-8000:])
        return fail(f"piplay train exited with {proc.returncode} (run directory {run_dir})", versions=versions)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r["learner/step_seconds"] for r in rows if "learner/step_seconds" in r]
    syncs = [r["weight_sync/seconds"] for r in rows if "weight_sync/seconds" in r]
    rates = [r["weight_sync/gb_per_s"] for r in rows if "weight_sync/gb_per_s" in r]
    if not steps or not syncs:
        return fail(f"the run logged no learner steps or no weight syncs (run directory {run_dir})",
                    versions=versions)
    print(json.dumps({"bench": "gpu_check", "ok": True, "device": torch.cuda.get_device_name(0), "engine": engine,
                      "steps": len(steps), "step_seconds": _mean(steps), "syncs": len(syncs),
                      "sync_seconds": _mean(syncs), "sync_gb_per_s": _mean(rates), "run_dir": str(run_dir),
                      "versions": versions}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
