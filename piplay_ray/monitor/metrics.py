"""The driver's metrics sink: one `log` call fans a step's metrics out to every backend.

`metrics.jsonl` in the run directory is the record the dashboard reads (one flushed line per call, so a
reader polling the file sees each step as soon as it is logged). TensorBoard event files go to
`run_dir/tensorboard/`; W&B is used only when asked for and importable (offline by default); system
gauges (throughput, weight sync, staleness, idle time) are also exported as Ray metrics, so a cluster's
Prometheus scrapes them, when Ray is initialised. The sink also writes `health.json` and the sampled
trajectories under `samples/` atomically, so the dashboard never reads a half-written file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from piplay_ray import rundir
from piplay_ray.roles import TRAINED

log = logging.getLogger(__name__)

PHASES = (*TRAINED, "eval", "system")
RESERVED = ("time", "iteration", "phase", "step")
# metric-name prefixes exported as Ray (Prometheus) gauges
GAUGE_PREFIXES = ("throughput/", "weight_sync/", "replay/", "learner/", "search/")


def _number(name: str, value: Any) -> float | int | None:
    """A JSON-safe number: bools and ints stay ints, non-finite floats become null."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
        if isinstance(value, bool | int):
            return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {name!r}: expected a number or a list of numbers, got {type(value).__name__}")


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a step's metrics: string names, numbers or lists of numbers (e.g. a solve-rate histogram)."""
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"metric names must be non-empty strings, got {name!r}")
        if name in RESERVED:
            raise ValueError(f"metric name {name!r} is reserved for the record's own field")
        if value is None:
            continue
        if isinstance(value, list | tuple) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0):
            seq = value.tolist() if hasattr(value, "tolist") else value
            out[name] = [_number(name, v) for v in seq]
        else:
            out[name] = _number(name, value)
    return out


def gauge_name(metric: str) -> str:
    """A Prometheus-legal gauge name for a metric name: `throughput/rollout_tokens_per_s` ->
    `piplay_throughput_rollout_tokens_per_s`."""
    return "piplay_" + re.sub(r"[^a-zA-Z0-9_]", "_", metric)


class MetricsSink:
    """Writes metrics to metrics.jsonl, TensorBoard, optionally W&B, and Ray gauges.

    `logging_cfg` is the config's `logging` section (`LoggingConfig`); None means metrics.jsonl plus
    TensorBoard. `config` (a dict) is handed to W&B as the run's config.
    """

    def __init__(self, run_dir: str | os.PathLike, logging_cfg: Any = None, *, config: dict | None = None,
                 run_name: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name or self.run_dir.name
        self._jsonl = open(self.run_dir / rundir.METRICS, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        self._wandb = None
        self._gauges: dict[str, Any] = {}
        self._closed = False
        if logging_cfg is None or getattr(logging_cfg, "tensorboard", True):
            self._tb = self._open_tensorboard()
        if logging_cfg is not None and getattr(logging_cfg, "wandb", False):
            self._wandb = self._open_wandb(logging_cfg, config)

    # ------------------------------------------------------------------------------------ backends

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is a dependency; say so rather than fail the run
            log.warning("TensorBoard logging disabled: %s", e)
            return None
        return SummaryWriter(log_dir=str(self.run_dir / rundir.TENSORBOARD), flush_secs=10)

    def _open_wandb(self, cfg: Any, config: dict | None):
        try:
            import wandb
        except ImportError:
            log.warning("logging.wandb is set but wandb is not installed; skipping W&B")
            return None
        mode = getattr(cfg, "wandb_mode", "offline")
        run = wandb.init(project=getattr(cfg, "wandb_project", "piplay-ray"), name=self.run_name, mode=mode,
                         dir=str(self.run_dir), config=config or {})
        return run

    def _gauge(self, metric: str):
        g = self._gauges.get(metric)
        if g is None:
            from ray.util.metrics import Gauge

            g = Gauge(gauge_name(metric), description=f"piplay-ray {metric}", tag_keys=("run", "phase"))
            self._gauges[metric] = g
        return g

    # ------------------------------------------------------------------------------------ logging

    def log(self, metrics: Mapping[str, Any], *, iteration: int, phase: str, step: int) -> dict:
        """Record one step's metrics; returns the line written to metrics.jsonl."""
        if self._closed:
            raise RuntimeError("MetricsSink.log after close()")
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if not isinstance(iteration, int) or not isinstance(step, int) or iteration < 0 or step < 0:
            raise ValueError(f"iteration and step must be non-negative ints, got {iteration!r}, {step!r}")
        values = clean_metrics(metrics)
        record = {"time": round(time.time(), 3), "iteration": iteration, "phase": phase, "step": step, **values}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()

        scalars = {k: v for k, v in values.items() if not isinstance(v, list) and v is not None}
        if self._tb is not None:
            for name, v in scalars.items():
                self._tb.add_scalar(name, v, global_step=step)
            for name, v in values.items():
                finite = [x for x in v if x is not None] if isinstance(v, list) else []
                if finite:
                    import numpy as np

                    self._tb.add_histogram(name, np.asarray(finite, dtype=np.float64), global_step=step)
        if self._wandb is not None:
            self._wandb.log({**scalars, "iteration": iteration, "global_step": step})
        self._export_gauges(scalars, phase)
        return record

    def _export_gauges(self, scalars: dict[str, float], phase: str) -> None:
        try:
            import ray

            if not ray.is_initialized():
                return
            for name, v in scalars.items():
                if name.startswith(GAUGE_PREFIXES):
                    self._gauge(name).set(float(v), tags={"run": self.run_name, "phase": phase})
        except Exception as e:  # metrics export must never stop training
            log.warning("Ray metrics export failed: %s", e)

    # ------------------------------------------------------------------------------------ rewinding

    def position(self) -> int:
        """How far metrics.jsonl is written (bytes): a checkpoint saves it, a restore rewinds to it."""
        self._jsonl.flush()
        return os.path.getsize(self._jsonl.name)

    def rewind(self, position: int, versions: Mapping[str, int], keep: Mapping[str, Iterable[int]] | None = None) -> None:
        """Forget what was recorded after a checkpoint that a run goes back to: metrics.jsonl is cut at
        `position` and the sample files of learner steps at or past `versions` (they are made again) are
        removed, but for the steps in `keep` (held by the restored replay store: not made again), so a
        re-done step has one record. TensorBoard and W&B keep both (they cannot be cut)."""
        self._jsonl.flush()
        os.truncate(self._jsonl.name, min(position, os.path.getsize(self._jsonl.name)))  # appends go on from there
        for role, version in versions.items():
            for path in rundir.samples_path(self.run_dir, role, 0).parent.glob(f"{role}-step-*.jsonl"):
                step = int(path.stem.rsplit("-", 1)[1])
                if step >= version and step not in set((keep or {}).get(role, ())):
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------ run files

    def write_health(self, actors: Mapping[str, Mapping[str, Any]]) -> None:
        """Write health.json: `{name: {"alive", "restarts", "last_error"}}` plus the update time."""
        body = {name: {"alive": bool(a.get("alive", False)), "restarts": int(a.get("restarts", 0)),
                       "last_error": None if a.get("last_error") is None else str(a["last_error"])}
                for name, a in actors.items()}
        rundir.write_atomic(self.run_dir / rundir.HEALTH, json.dumps({"actors": body, "updated": time.time()}))

    def write_samples(self, role: str, step: int, samples: Iterable[Mapping[str, Any]]) -> Path:
        """Write `samples/{role}-step-{step:06d}.jsonl`: one `{"task", "trajectory", "reward", "tokens",
        "token_kl"}` object per sampled trajectory (records.to_dict for the dataclasses)."""
        if role not in TRAINED:
            raise ValueError(f"role must be one of {TRAINED}, got {role!r}")
        lines = [json.dumps(_jsonable(s), ensure_ascii=False) for s in samples]
        return rundir.write_atomic(rundir.samples_path(self.run_dir, role, step),
                                   "".join(line + "\n" for line in lines))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _jsonable(obj: Any) -> Any:
    """Dataclasses to dicts and non-finite floats to null (JSON has no NaN)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


LOSS_TERMS = {"loss", "pg_loss", "clip_frac", "policy_kl", "ref_kl", "distill_kl", "teacher_top1_mismatch",
              "entropy", "logp_mismatch_mean", "logp_mismatch_max", "is_weight", "is_truncated_frac"}


def learner_metrics(m: Mapping[str, Any]) -> dict:
    """Namespace the learner's step metrics the way the dashboard reads them."""
    out = {}
    for k, v in m.items():
        if k == "tokens_per_s":
            out["throughput/learner_tokens_per_s"] = v
        elif k != "version":
            out[("loss/" if k in LOSS_TERMS else "learner/") + k] = v
    return out
