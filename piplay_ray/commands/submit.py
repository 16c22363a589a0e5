"""`piplay submit --config F [--address A] [--wait] [overrides...]`: run `piplay train` on an existing Ray cluster through the Ray Jobs API (`ray job submit`).

The project folder is uploaded as the job's working directory (without the venv, git data, run folders and
caches), so the job runs exactly the local code and configs: the entrypoint is
`python -m piplay_ray train --config <path inside the project> run.mode=cluster ...`, which imports the uploaded
package before any copy installed in the cluster image. Dependencies come from the image, or from `--pip`.
The config is validated locally first, so a typo fails in a second instead of after the upload.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from piplay_ray.config import load_config

# Never uploaded: the venv, VCS data, run outputs and caches. Ray also honours .gitignore/.rayignore.
DEFAULT_EXCLUDES = (
    ".venv/", ".venv-gpu/", "venv/", ".git/", "runs/", "test-artifacts/", "build/", "dist/", "*.egg-info/",
    "__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", "*.safetensors", "*.gguf",
)
# Forwarded into the job when set here: asset and cache locations, offline switches, Ray auth mode.
FORWARDED_ENV = (
    "PIPLAY_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_AUTH_MODE",
    "VLLM_CPU_KVCACHE_SPACE", "DS_ACCELERATOR", "WANDB_MODE", "WANDB_PROJECT",
)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """A submission that cannot be made; the message says what to change."""


def default_address() -> str:
    return os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


def project_root() -> Path:
    """The folder holding this package's source tree (the working directory to upload)."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def config_in_project(config: str | os.PathLike, working_dir: Path) -> str:
    """`config` as a POSIX path relative to `working_dir`; it must lie inside it to be uploaded.

    A relative path is taken from the current directory, or else from `working_dir`.
    """
    path, root = Path(config), working_dir.resolve()
    if not path.is_absolute() and not path.is_file() and (root / path).is_file():
        path = root / path
    path = path.resolve()
    if not path.is_file():
        raise SubmitError(f"config file not found: {config}")
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(
            f"config {path} is outside the uploaded working directory {root}; move it into the project, pass "
            "--working-dir, or pass --config-on-cluster if the path exists on the cluster"
        ) from None


def parse_env(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`KEY=VALUE` sets a value; a bare `KEY` copies it from this environment."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "").isalnum():
            raise SubmitError(f"--env expects KEY=VALUE or KEY, got {item!r}")
        if not sep:
            if key not in os.environ:
                raise SubmitError(f"--env {key}: not set in this environment")
            value = os.environ[key]
        env[key] = value
    return env


def parse_pip(items: list[str] | tuple[str, ...]) -> list[str]:
    """Package specs; an existing file is read as a requirements file (comments and blanks skipped)."""
    specs: list[str] = []
    for item in items:
        if os.path.isfile(item):
            lines = (ln.split("#", 1)[0].strip() for ln in open(item, encoding="utf-8"))
            specs += [ln for ln in lines if ln]
        else:
            specs.append(item)
    return specs


def runtime_env(
    working_dir: Path,
    env: dict[str, str] | None = None,
    pip: list[str] | None = None,
    excludes: list[str] | tuple[str, ...] = (),
) -> dict:
    """The job's runtime environment: uploaded project, forwarded + explicit env vars, optional pip packages."""
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env_vars["PYTHONUNBUFFERED"] = "1"
    # The driver's own ray.init(runtime_env=...) may set keys forwarded here; let it merge instead of failing.
    env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    env_vars.update(env or {})
    out: dict = {
        "working_dir": str(working_dir),
        "excludes": list(dict.fromkeys([*DEFAULT_EXCLUDES, *excludes])),
        "env_vars": env_vars,
    }
    if pip:
        out["pip"] = list(pip)
    return out


def train_entrypoint(config: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """`piplay train` in cluster mode; user overrides come last so they win."""
    return shlex.join([
        "python", "-m", "piplay_ray", "train", "--config", config, "run.mode=cluster", *overrides,
    ])


def submit(
    config: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    address: str | None = None,
    working_dir: str | os.PathLike | None = None,
    entrypoint: str | None = None,
    env: dict[str, str] | None = None,
    pip: list[str] | None = None,
    excludes: list[str] | tuple[str, ...] = (),
    submission_id: str | None = None,
    config_on_cluster: bool = False,
    validate: bool = True,
) -> str:
    """Submit `piplay train --config config overrides` (or `entrypoint`) and return the job's submission id."""
    from ray.job_submission import JobSubmissionClient

    root = Path(working_dir or project_root()).resolve()
    if not root.is_dir():
        raise SubmitError(f"working directory not found: {root}")
    if config_on_cluster:
        cfg_arg = str(config)
    else:
        cfg_arg = config_in_project(config, root)
        if validate:
            cfg = load_config(root / cfg_arg, ["run.mode=cluster", *overrides])  # ConfigError lists every problem
            if not Path(cfg.run.dir or cfg.run.root).is_absolute():
                print(f"piplay submit: warning: run directory {cfg.run.dir or cfg.run.root!r} is relative, so the run "
                      "lands in the job's temporary working directory on the head; set run.root (or run.dir) to "
                      "shared storage, e.g. run.root=/shared/piplay/runs", file=sys.stderr)
    client = JobSubmissionClient(address or default_address())
    return client.submit_job(
        entrypoint=entrypoint or train_entrypoint(cfg_arg, overrides),
        runtime_env=runtime_env(root, env, pip, excludes),
        submission_id=submission_id,
        metadata={"piplay_config": cfg_arg},
    )


def wait(job_id: str, address: str | None = None, timeout_s: float = 3600.0, follow: bool = False) -> str:
    """Block until the job reaches a terminal state and return it; with `follow`, stream its logs to stdout."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address or default_address())
    if follow:
        async def _tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                print(chunk, end="", flush=True)

        try:
            asyncio.run(asyncio.wait_for(_tail(), timeout_s))
        except TimeoutError:
            pass
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def hints(job_id: str, address: str) -> str:
    a = shlex.quote(address)
    return (
        f"submitted job {job_id} to {address}\n"
        f"  follow logs: ray job logs --address {a} --follow {job_id}\n"
        f"  status:      ray job status --address {a} {job_id}\n"
        f"  stop:        ray job stop --address {a} {job_id}\n"
        f"  dashboard:   {address.rstrip('/')}/#/jobs/{job_id}"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML config inside the working directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. schedule.iterations=1")
    p.add_argument("--address", default=None, help="Ray dashboard address (default $RAY_ADDRESS or "
                   "http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=None, help="folder to upload (default: this project)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]", help="job env var (repeatable)")
    p.add_argument("--pip", action="append", default=[], metavar="SPEC|FILE",
                   help="pip package or requirements file installed for the job (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="extra upload exclude pattern (repeatable)")
    p.add_argument("--entrypoint", default=None, help="run this command instead of `piplay train` (same env)")
    p.add_argument("--submission-id", default=None, help="job id to use (default: generated)")
    p.add_argument("--config-on-cluster", action="store_true", help="the config path exists on the cluster; "
                   "do not check or upload it")
    p.add_argument("--wait", action="store_true", help="follow the logs and exit 0 only if the job succeeds")
    p.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="--wait limit in seconds")


def run(args) -> int:
    address = args.address or default_address()
    try:
        job_id = submit(
            args.config, args.overrides, address=address, working_dir=args.working_dir,
            entrypoint=args.entrypoint, env=parse_env(args.env), pip=parse_pip(args.pip),
            excludes=args.exclude, submission_id=args.submission_id, config_on_cluster=args.config_on_cluster,
        )
    except SubmitError as e:
        print(f"piplay submit: {e}", file=sys.stderr)
        return 2
    print(hints(job_id, address), flush=True)
    if not args.wait:
        return 0
    status = wait(job_id, address, timeout_s=args.timeout, follow=True)
    print(f"\njob {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
