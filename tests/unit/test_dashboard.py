"""The dashboard server without a browser: its JSON endpoints over a run directory written in the contract
format, incremental metrics reads, and its safety rules (loopback, read-only, no reads outside the run)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from helpers.run_dir import XSS_TASK_ID, XSS_TEXT, write_run

from piplay_ray.monitor.dashboard.server import STATIC_DIR, RunReader, start_dashboard


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    facts = write_run(d)
    (d.parent / "secret.txt").write_text("outside the run")
    return d, facts


@pytest.fixture(scope="module")
def server(run):
    url, stop = start_dashboard(run[0], "127.0.0.1", 0)
    yield url
    stop()


def get(url, path, method="GET", headers=None):
    host, port = url.split("//")[1].strip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest(method, path, skip_host=headers is not None and "Host" in headers)
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body


def get_json(url, path):
    status, _, body = get(url, path)
    return status, json.loads(body)


def test_metrics_endpoint_returns_every_record(run, server):
    d, facts = run
    status, res = get_json(server, "/api/metrics?offset=0")
    assert status == 200 and not res["more"]
    assert len(res["rows"]) == facts["records"]
    assert res["rows"] == [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert res["next"] == (d / "metrics.jsonl").stat().st_size
    status, again = get_json(server, f"/api/metrics?offset={res['next']}")
    assert again["rows"] == [] and again["next"] == res["next"]


def test_metrics_reads_are_incremental_and_tolerant(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = RunReader(tmp_path)
    assert reader.metrics(0) == {"rows": [], "next": 0, "reset": False, "more": False}
    path.write_text('{"step": 1, "iteration": 0, "phase": "student", "student/em": 0.5}\n{"step": 2, "stud')
    first = reader.metrics(0)
    assert [r["step"] for r in first["rows"]] == [1]  # the unfinished line waits
    with open(path, "a") as f:
        f.write('ent/em": NaN}\nnot json\n{"step": 3}\n')
    second = reader.metrics(first["next"])
    assert second["rows"] == [{"step": 2, "student/em": None}, {"step": 3}]  # NaN -> null, junk skipped
    path.write_text('{"step": 9}\n')  # a new file, shorter than our offset
    third = reader.metrics(second["next"])
    assert third["reset"] and third["rows"] == [{"step": 9}]
    # a run rewound to a checkpoint (cut back) and then wrote past the page's offset: mid-line, start over
    path.write_text('{"step": 1}\n{"step": 2}\n')
    at = reader.metrics(0)["next"]
    path.write_text('{"step": 1}\n{"step": 22, "x": 1}\n')  # the rewound step 2, longer, re-done
    fourth = reader.metrics(at)
    assert fourth["reset"] and [r["step"] for r in fourth["rows"]] == [1, 22]


def test_tasks_and_task_detail(run, server):
    d, facts = run
    status, res = get_json(server, "/api/tasks")
    assert status == 200
    assert sorted(t["id"] for t in res["tasks"]) == sorted(facts["task_ids"])
    assert res["iterations"] == [0, 1, 2]
    # sample counts and mean rewards, recomputed from the sample files
    want: dict[str, list[float]] = {}
    for f in (d / "samples").glob("student-*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            want.setdefault(rec["task"]["id"], []).append(rec["reward"])
    for t in res["tasks"]:
        rewards = want.get(t["id"], [])
        assert t["samples"] == len(rewards)
        assert t["mean_reward"] == (pytest.approx(sum(rewards) / len(rewards)) if rewards else None)
    status, detail = get_json(server, "/api/task?id=it2-t0")
    assert status == 200
    assert detail["task"]["answer"] == "Eisenach" and len(detail["task"]["qcp"]) == 2
    assert len(detail["samples"]) == len(want["it2-t0"])
    s = detail["samples"][0]
    assert len(s["tokens"]) == len(s["token_kl"]) > 0
    assert not {"response_ids", "logprobs", "mask", "prompt_ids"} & set(s["trajectory"])
    assert get_json(server, "/api/task?id=nope")[0] == 404
    assert get_json(server, "/api/task")[0] == 400


def test_health_and_run(run, server):
    status, h = get_json(server, "/api/health")
    assert status == 200 and h["actors"]["teacher"] == {"alive": False, "restarts": 3,
                                                        "last_error": "OOM while scoring"}
    status, info = get_json(server, "/api/run")
    assert info["name"] == run[0].name and "iterations: 3" in info["config"]


def test_page_and_static_files_are_local(server):
    status, headers, body = get(server, "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    for src in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert src.startswith("/static/"), src  # no CDN: everything comes from this server
        assert get(server, src)[0] == 200
    app = (STATIC_DIR / "app.js").read_text()
    assert "innerHTML" not in app and "insertAdjacentHTML" not in app and "document.write" not in app
    assert (STATIC_DIR / "uPlot.LICENSE").read_text().startswith("The MIT License")


@pytest.mark.parametrize("path", [
    "/static/../metrics.jsonl", "/static/%2e%2e/%2e%2e/secret.txt", "/../secret.txt",
    "/api/file?path=../secret.txt", "/api/file?path=logs/../../secret.txt", "/api/file?path=%2Fetc%2Fpasswd",
    "/api/file?path=/etc/passwd", "/api/file?path=..%5Csecret.txt",
])
def test_path_traversal_is_refused(server, path):
    status, _, body = get(server, path)
    assert status == 400, (path, status, body)
    assert b"outside the run" not in body and b"root:" not in body


def test_symlinks_out_of_the_run_are_refused(run, server):
    d, _ = run
    link = d / "logs" / "escape.txt"
    if not link.exists():
        os.symlink(d.parent / "secret.txt", link)
    assert get(server, "/api/file?path=logs/escape.txt")[0] == 403
    status, res = get_json(server, "/api/file?path=logs/driver.log")
    assert status == 200 and res["text"] == "driver started\n"
    assert get(server, "/static/secret.txt")[0] == 404
    assert get(server, "/api/file?path=logs/missing.log")[0] == 404


def test_no_endpoint_reads_a_file_symlinked_out_of_the_run(tmp_path):
    """Every fixed file and folder the reader opens, replaced by a symlink out of the run, reads as absent."""
    run, out = tmp_path / "run", tmp_path / "outside"
    write_run(run)
    shutil.copytree(run, out)  # well-formed files, so only the containment rule can refuse them
    (out / "health.json").write_text(json.dumps({"actors": {"secret": {"state": "ALIVE"}}, "updated": 1.0}))
    for name in ("config.yaml", "metrics.jsonl", "health.json", "samples", "tasks"):
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        os.symlink(out / name, p)
    for ev in (run / "eval").iterdir():
        (ev / "metrics.json").unlink()
        os.symlink(out / "eval" / ev.name / "metrics.json", ev / "metrics.json")
    r = RunReader(run)
    assert r.run_info()["config"] is None and r.metrics(0)["rows"] == []
    assert r.health() == {"actors": {}, "updated": None}
    assert r.tasks()["tasks"] == [] and r.summary()["student_reward"] is None and "em_before" not in r.summary()
    inside = RunReader(out)  # the same files, read in their own run
    assert inside.tasks()["tasks"] and inside.metrics(0)["rows"] and inside.summary()["student_reward"] is not None
    assert "em_before" in inside.summary() and inside.run_info()["config"]
    url, stop = start_dashboard(run, "127.0.0.1", 0)
    try:
        for path in ("/api/run", "/api/metrics", "/api/tasks", "/api/summary", "/api/health"):
            status, _, body = get(url, path)
            assert status == 200 and b"fixture" not in body and b"secret" not in body, path
        assert get(url, "/api/file?path=metrics.jsonl")[0] == 403
    finally:
        stop()


def test_read_only_and_loopback_host_only(server):
    for method in ("POST", "PUT", "DELETE"):
        assert get(server, "/api/run", method=method)[0] == 405
    assert get(server, "/api/run", headers={"Host": "evil.example:80"})[0] == 403
    assert get(server, "/api/run", headers={"Host": "localhost"})[0] == 200
    assert get(server, "/nope")[0] == 404


def test_xss_payload_is_only_data(server):
    status, detail = get_json(server, f"/api/task?id={XSS_TASK_ID}")
    assert status == 200 and detail["task"]["answer"] == XSS_TEXT  # the server hands it over verbatim as JSON
    _, headers, _ = get(server, f"/api/task?id={XSS_TASK_ID}")
    assert headers["Content-Type"].startswith("application/json")


def test_binds_loopback_and_stops(tmp_path):
    write_run(tmp_path, iterations=1, steps_per_phase=1)
    url, stop = start_dashboard(tmp_path, port=0)
    assert url.startswith("http://127.0.0.1:")
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    assert get_json(url, "/api/run")[0] == 200
    stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    with pytest.raises(FileNotFoundError, match="run directory"):
        start_dashboard(tmp_path / "missing", port=0)


def test_busy_port_falls_back_to_a_free_one(run, server):
    busy = int(server.rstrip("/").rsplit(":", 1)[1])
    url, stop = start_dashboard(run[0], "127.0.0.1", busy)
    try:
        assert url != server and get_json(url, "/api/run")[0] == 200
    finally:
        stop()


def test_cli_serves_a_finished_run(run, tmp_path):
    cmd = [sys.executable, "-m", "piplay_ray", "dashboard", str(run[0]), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        status, info = get_json(url, "/api/run")
        assert status == 200 and info["name"] == run[0].name
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    missing = subprocess.run([*cmd[:4], str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "run directory not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_summary_endpoint_is_live(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    url, stop = start_dashboard(run, "127.0.0.1", 0)
    try:
        status, s = get_json(url, "/api/summary")
        assert status == 200 and s["gate_pass_rate"] is None and "em_before" not in s
        assert not any(t["met"] for t in s["targets"].values())
        rows = [{"step": 1, "phase": "examiner", "examiner/gate_pass_rate": 0.2, "examiner/attempts": 5},
                {"step": 2, "phase": "examiner", "examiner/gate_pass_rate": 0.6, "examiner/attempts": 5},
                {"step": 2, "phase": "examiner", "tasks/size": 12, "tasks/examiner_written": 3},
                {"step": 3, "phase": "student", "student/groups_with_signal": 0.75, "student/answer_rate": 0.5}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for name, em, invalid in (("before-training", 0.1, 0.5), ("iter-0", 0.3, 0.1)):
            (run / "eval" / name).mkdir(parents=True)
            (run / "eval" / name / "metrics.json").write_text(json.dumps(
                {"summary": {"overall": {"em": em, "n": 100, "invalid": invalid, "searches": 1.25}}}))
        status, s = get_json(url, "/api/summary")  # recomputed on each request: the new files show at once
    finally:
        stop()
    assert status == 200
    assert s["gate_pass_rate"] == pytest.approx(0.4) and s["examiner_written_share"] == pytest.approx(0.25)
    assert s["em_before"] == 0.1 and s["em_after"] == 0.3 and s["eval_n"] == 100
    assert s["em_before_se"] == pytest.approx(0.03) and s["em_after_se"] == pytest.approx(0.0458257569)
    t = s["targets"]
    assert t["answer_rate"]["value"] == pytest.approx(0.9) and t["answer_rate"]["met"]
    assert t["searches_per_question"]["value"] == 1.25 and t["gate_pass_rate"]["met"]
    assert not t["examiner_written_share"]["met"] and t["groups_with_signal"]["met"]
    assert t["em_gain"]["value"] == pytest.approx(0.2) and t["em_gain"]["met"]
