"""The teacher's weights: an EMA of the student's, psi <- (1 - tau) psi + tau theta, and its checkpoint file.

The masters are float32 (a bf16 lerp would round the update away); `EmaState` is what both teacher forms
(the actor, `actor.py`, and the shared adapter on the driver, `shared.py`) share: save, restore, copy.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor


@torch.no_grad()
def ema_(target: Iterable[Tensor], source: Iterable[Tensor], tau: float) -> None:
    """In place: target <- (1 - tau) * target + tau * source, tensor by tensor (paper: psi <- EMA of theta)."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"ema tau must be in [0, 1], got {tau}")
    for t, s in zip(target, source, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"ema_: shape mismatch {tuple(t.shape)} vs {tuple(s.shape)}")
        s = s.to(device=t.device)
        if tau == 1.0:
            t.copy_(s)
        else:
            # blend in float32; a bf16 target still rounds the result, so keep EMA masters in float32
            t.copy_(t.float().lerp_(s.float(), tau))


def blend_(master: dict[str, Tensor], weights: Iterable[tuple[str, Tensor]], tau: float,
           alias: dict[str, str] | None = None) -> int:
    """In place: master <- (1 - tau) master + tau theta over every tensor of `master`, theta streamed as
    (name, tensor) pairs; `alias` maps each name to its canonical one (a tied alias is blended once). An
    update that names an unknown tensor or lacks one is refused: a partial EMA step is never silent."""
    done: set[str] = set()
    for name, tensor in weights:
        key = alias.get(name) if alias is not None else (name if name in master else None)
        if key is None:
            raise ValueError(f"teacher: unknown parameter {name!r} (not in the teacher's model)")
        if key in done:
            continue  # a tied alias of a tensor already blended
        ema_([master[key]], [tensor.detach()], tau)
        done.add(key)
    missing = set(master) - done
    if missing:
        raise ValueError(f"teacher: the update lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
    return len(done)


EMA_FILE = "teacher.safetensors"  # in a checkpoint's teacher folder: the EMA masters, version in the metadata


_SAFE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def save_ema(folder: str | Path, master: dict[str, Tensor], version: int) -> str:
    """Write the EMA masters (full weights, or the EMA adapter under learner.lora) exactly, with their version,
    as a safetensors file streamed one tensor at a time: the masters may live on the teacher's GPU, and a copy
    of all of them in host memory (what `safetensors.save_file` needs) would be the model again in float32.
    Written beside and renamed, so a crash mid-write leaves the previous file."""
    header: dict = {"__metadata__": {"version": str(version)}}
    offset = 0
    for name, t in master.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFE_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / EMA_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in master.values():
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
    os.replace(tmp, path)
    return str(path)


def saved_version(folder: str | Path) -> int:
    """The version `save_ema` wrote to `folder` (its header only): what a check of a save must read, not the
    version the teacher holds by the time it is asked."""
    with open(Path(folder) / EMA_FILE, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return int(json.loads(f.read(size))["__metadata__"]["version"])


def read_ema(folder: str | Path) -> tuple[int, list[tuple[str, Tensor]]]:
    """(version, tensors) as `save_ema` wrote them."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / EMA_FILE), framework="pt") as f:
        return int((f.metadata() or {}).get("version", 0)), [(n, f.get_tensor(n)) for n in f.keys()]


class EmaState:
    """Checkpointing of a teacher holding float32 `master` tensors at `version`; the class provides
    `async load(version, weights)` (psi <- theta exactly)."""

    master: dict[str, Tensor]
    version: int

    async def load(self, version: int, weights) -> None:
        raise NotImplementedError

    async def save(self, folder: str) -> str:
        """Write the EMA masters and version to `folder/teacher.safetensors` (checkpoints)."""
        return save_ema(folder, self.master, self.version)

    async def load_checkpoint(self, folder: str) -> int:
        """Restore what `save` wrote; returns the restored version."""
        version, weights = read_ema(folder)
        await self.load(version, weights)
        return version

    def state(self) -> dict[str, Tensor]:
        """A host copy of the EMA masters, wherever they live (tests)."""
        return {n: t.detach().to("cpu", copy=True) for n, t in self.master.items()}
