"""Checkpoint layout, atomic writes, retention and discovery.

A checkpoint is `run_dir/checkpoints/step-{n:06d}/` holding, per trained role, a Hugging Face model folder
(safetensors, config, tokenizer, chat template: loadable by transformers and vLLM as is; with LoRA the merged
model, and the adapter in PEFT format under `adapter/`) and the DeepSpeed training state (optimizer shards,
scheduler), plus RNG states per rank, the learner's policy
versions and the driver's own state. It is written under a hidden temporary name and renamed into place
once everything is on disk, then marked complete, so a crash never leaves a checkpoint that resume
would pick up half-written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from piplay_ray.rundir import checkpoints_root

COMPLETE = "COMPLETE"
DRIVER_STATE = "driver_state.json"
LEARNER_STATE = "learner_state.json"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of learner step `step` lives (run dir or its checkpoints folder)."""
    return checkpoints_root(run_dir) / f"step-{step:06d}"


def is_step_dir(path: str | os.PathLike) -> bool:
    return bool(_STEP.match(Path(path).name))


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and is_complete(p)]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (run dir or its checkpoints folder), or None (a fresh run)."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints and any leftover temporary folders."""
    if keep < 1:
        raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    found = list_checkpoints(run_dir)
    doomed = [p for _, p in found[:-keep]]
    root = checkpoints_root(run_dir)
    if root.is_dir():
        doomed += [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success mark it complete and rename it to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)  # on disk before it is called complete: a power loss must not leave a complete stub
        (tmp / COMPLETE).write_text("ok\n")
        fsync_tree(tmp)
        if final.exists():  # re-saving the same step: the older copy goes only once the new one is whole
            old = final.parent / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_tree(final.parent, files=False)  # the rename itself
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(root: Path, files: bool = True) -> None:
    """fsync every file under `root` (with `files`) and every folder, so what was written survives a crash."""
    for folder, _, names in os.walk(root) if files else [(root, [], [])]:
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True))


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def read_driver_state(ckpt: str | os.PathLike) -> dict:
    return read_json(Path(ckpt) / DRIVER_STATE)


# ------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ HF export


def save_hf(model: torch.nn.Module, tokenizer, state_dict: dict[str, torch.Tensor], out: str | os.PathLike) -> None:
    """A Hugging Face folder (safetensors + config + generation config + tokenizer with chat template)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
