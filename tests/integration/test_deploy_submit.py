"""The submission path end to end: a real local Ray head (`ray start --head`), jobs submitted through
deploy/submit.sh exactly as on a cluster, the head stopped afterwards.

The head runs on free ports with its own temp folder and is stopped by signalling the processes it started
(never `ray stop`, which would also kill other people's Ray sessions on a shared machine). Token auth: a
local `ray.init()` leaves ~/.ray/auth_token behind, after which a new head turns token auth on and job
submission needs the token; both the head and the client run with RAY_AUTH_MODE=disabled (DESIGN.md 4).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers.runs import ROOT

SUBMIT = ROOT / "deploy" / "submit.sh"
RAY = Path(sys.executable).parent / "ray"


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free now, drawn below the kernel's ephemeral range (where outgoing
    connections take theirs), so another process is unlikely to take one before the head binds it; the
    head is started again on new ports if one was taken all the same."""
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for port in random.sample(range(max(1024, lo - 12000), lo), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports below {lo}")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", PYTHON=sys.executable, **extra)
    # as with an activated venv: the head, and the job entrypoint's `python`, are this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _stop(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head we started: SIGTERM to `ray start --block` (it shuts its processes down), then kill any
    process of ours still naming our temp folder."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline", "username"]):
        try:
            if p.info["username"] == psutil.Process().username() and temp_dir in " ".join(p.info["cmdline"] or []):
                leftovers.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in leftovers:
        p.kill()
    psutil.wait_procs(leftovers, timeout=10)


def _start_head(temp_dir: str) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports; (process, dashboard address) once its jobs API answers,
    or (exited process, "") when the head stopped early (e.g. a port was taken meanwhile)."""
    gcs, dash, agent, metrics, client = _free_ports(5)
    cmd = [
        str(RAY), "start", "--head", "--block", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
        "--metrics-export-port", str(metrics), "--ray-client-server-port", str(client),
        "--num-cpus", "8", "--num-gpus", "0", "--temp-dir", temp_dir, "--include-dashboard", "true",
        "--disable-usage-stats",
    ]
    with open(Path(temp_dir) / "head.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{address}/api/jobs/", timeout=5) as r:
                json.load(r)
            return proc, address
        except Exception:
            time.sleep(1)
    return proc, ""


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with its dashboard on 127.0.0.1; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="prh-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    procs = []
    try:
        for _ in range(3):
            proc, address = _start_head(temp_dir)
            procs.append(proc)
            if address:
                break
            _stop(proc, temp_dir)
        else:
            raise RuntimeError("Ray head did not start: " + (Path(temp_dir) / "head.log").read_text()[-3000:])
        yield address
    finally:
        for proc in procs:
            _stop(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SUBMIT), "--address", address, *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env), cwd="/")


CHECK = """
import json, os, subprocess, sys
checks = {
    "project": os.path.isfile("configs/tiny.yaml") and os.path.isdir("piplay_ray"),
    "no_venv": not os.path.exists(".venv"),
    "no_git": not os.path.exists(".git"),
    "env": os.environ.get("PIPLAY_DEPLOY_MARK") == "m1" and os.environ.get("RAY_AUTH_MODE") == "disabled",
    "home": os.environ.get("PIPLAY_HOME") == sys.argv[2],
    "ray_address": bool(os.environ.get("RAY_ADDRESS")),
}
shown = subprocess.run([sys.executable, "-m", "piplay_ray", "config", "show", "--config", "configs/tiny.yaml",
                        "run.mode=cluster"], capture_output=True, text=True)
checks["config_show"] = shown.returncode == 0 and "mode: cluster" in shown.stdout
json.dump(checks, open(sys.argv[1], "w"))
sys.exit(0 if all(checks.values()) else 1)
"""


def test_submit_runs_the_uploaded_project_with_its_env(ray_head, tmp_path):
    out = tmp_path / "checks.json"
    home = os.environ.get("PIPLAY_HOME", str(tmp_path / "home"))
    entry = f"python -c '{CHECK}' {out} {home}"
    proc = _submit(ray_head, "--config", "configs/tiny.yaml", "--env", "PIPLAY_DEPLOY_MARK=m1",
                   "--entrypoint", entry, "--wait", PIPLAY_HOME=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"ray job logs --address {ray_head} --follow {job_id}" in proc.stdout
    assert f"{ray_head}/#/jobs/{job_id}" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    assert json.loads(out.read_text()) == dict.fromkeys(
        ["project", "no_venv", "no_git", "env", "home", "ray_address", "config_show"], True)


def test_failed_job_fails_the_wrapper(ray_head):
    proc = _submit(ray_head, "--config", "configs/tiny.yaml", "--entrypoint",
                   "python -c 'import sys; print(\"boom\"); sys.exit(3)'", "--wait")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "boom" in proc.stdout and proc.stdout.rstrip().endswith("FAILED")


def test_submit_tiny_training_run(ray_head, tiny_model, tmp_path):
    """The issue's acceptance test: `piplay train` on configs/tiny.yaml as a Ray job, to SUCCEEDED. The rollout
    engine is transformers: what is tested is the job, and a vLLM engine's start-up would double its time."""
    run_dir = tmp_path / "run"
    proc = _submit(ray_head, "--config", "configs/tiny.yaml", f"run.dir={run_dir}", "rollout.engine=transformers",
                   "--wait", "--timeout", "1500",
                   timeout=1600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("SUCCEEDED")
    assert (run_dir / "config.yaml").is_file()
    from piplay_ray.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    assert cfg.run.mode == "cluster" and cfg.model.base == "builtin:tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    phases = {r["phase"] for r in rows}
    assert {"examiner", "student"} <= phases
    assert (run_dir / "tasks" / "iter-0.jsonl").is_file()
    assert any((run_dir / "checkpoints").glob("step-*"))
