"""The dashboard page in a real headless Chromium (Debian's `chromium`): the rendered DOM has the run summary on
top, charts with data points and axes fitted to their data, the other metrics in collapsed namespace groups,
the solve-rate table, actor health, and a task with its QCP and a trajectory coloured by
teacher-student KL; model text containing markup renders as text; a screenshot lands in test-artifacts/.

The page is served from a run directory written in the contract format (tests/helpers/run_dir.py), or from
$PIPLAY_DASHBOARD_RUN_DIR when set (e.g. the run directory `make run` produced).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers.run_dir import XSS_TASK_ID, XSS_TEXT, write_run
from helpers.runs import ROOT

from piplay_ray.config import LoggingConfig
from piplay_ray.monitor import summary
from piplay_ray.monitor.dashboard import server as dashboard_server
from piplay_ray.monitor.dashboard.server import start_dashboard
from piplay_ray.monitor.metrics import MetricsSink

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
NO_CHROMIUM = (f"Debian's chromium is not installed ({CHROMIUM} missing): `make browser` installs it (as root with "
               "apt-get); set PIPLAY_SKIP_BROWSER=1 to skip the dashboard browser tests knowingly")


@pytest.fixture(autouse=True, scope="module")
def _chromium_present():
    """A missing browser fails these tests (CI must not pass without them) unless skipping was asked for."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("PIPLAY_SKIP_BROWSER") == "1":
            pytest.skip(NO_CHROMIUM)
        pytest.fail(NO_CHROMIUM)


# ---------------------------------------------------------------------------------------- a tiny DOM


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag=None, cls=None, **attrs):
        out = []
        for n in self.iter():
            if tag and n.tag != tag:
                continue
            if cls and cls not in (n.attrs.get("class") or "").split():
                continue
            if all(n.attrs.get(k.replace("_", "-")) == v if v is not True else k.replace("_", "-") in n.attrs
                   for k, v in attrs.items()):
                out.append(n)
        return out

    def by_id(self, id_):
        found = self.find_all(id=id_)
        assert found, f"#{id_} missing from the page"
        return found[0]


class DomBuilder(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {})

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse(html: str) -> Node:
    b = DomBuilder()
    b.feed(html)
    return b.root


# ---------------------------------------------------------------------------------------- fixtures


def chromium(url: str, profile: Path, *extra: str, budget_ms: int = 10000) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,3400",
           "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    given = os.environ.get("PIPLAY_DASHBOARD_RUN_DIR")
    if given:
        return Path(given)
    d = tmp_path_factory.mktemp("run")
    write_run(d)
    return d


@pytest.fixture(scope="module")
def url(run_dir):
    u, stop = start_dashboard(run_dir, "127.0.0.1", 0)
    yield u
    stop()


@pytest.fixture(scope="module")
def page(url, tmp_path_factory) -> Node:
    res = chromium(url, tmp_path_factory.mktemp("profile"), "--dump-dom")
    assert res.returncode == 0 and "<html" in res.stdout, res.stderr[-2000:]
    return parse(res.stdout)


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------- tests


def test_charts_have_data_points(page, run_dir):
    rows = metric_rows(run_dir)
    present = {k for r in rows for k, v in r.items() if isinstance(v, int | float)}
    charts = [n for n in page.find_all(cls="chart") if n.attrs.get("data-series")]
    assert len(charts) >= 16
    for chart in charts:
        keys = chart.attrs["data-series"].split(",")
        # the count the page drew equals the number of (step, value) points in metrics.jsonl
        if chart.attrs["id"].endswith("-iter"):
            want = sum(len({r["iteration"] for r in rows if isinstance(r.get(k), int | float)}) for k in keys)
        else:
            want = sum(len({r["step"] for r in rows if isinstance(r.get(k), int | float)}) for k in keys)
        assert int(chart.attrs["data-points"]) == want, chart.attrs["id"]
        if set(keys) & present:
            assert want > 0 and chart.find_all("canvas"), f"{chart.attrs['id']} drew nothing"
    assert int(page.by_id("chart-rewards").attrs["data-points"]) > 0
    assert int(page.by_id("chart-loss-distill-kl").attrs["data-points"]) > 0


def test_summary_panel_tells_the_story_first(page, run_dir):
    want = summary.compute(run_dir)
    main = page.find_all("main")[0]
    first = next(c for c in main.children if not isinstance(c, str))
    assert first.attrs["id"] == "panel-summary"  # the first thing on the page
    em = page.by_id("summary-em")
    for label in ("before", "after"):
        if f"em_{label}" in want:
            assert float(em.attrs[f"data-{label}"]) == pytest.approx(want[f"em_{label}"])
            se = want[f"em_{label}_se"]
            assert f"{want[f'em_{label}']:.3f} ± {se:.3f}" in em.text
    assert int(em.attrs["data-n"]) == want["eval_n"] and f"n = {want['eval_n']}" in em.text
    # the natural questions are the headline, paired by question; the rule-built set follows as the protocol check
    assert em.attrs["data-set"] == want["eval_set"] == "natural" and em.text.startswith("natural-question EM")
    c = want["em_change"]
    got = re.fullmatch(r"paired by question \+([\d.]+) ± ([\d.]+), (\d+) gained, (\d+) lost \(n = (\d+)\)",
                       page.by_id("summary-paired").text)
    assert got and [float(x) for x in got.groups()] == pytest.approx(
        [c["delta"], c["se"], c["gained"], c["lost"], c["n"]], abs=1e-3)  # JS rounds halves up
    rule = page.find_all("div", data_set="rule")
    assert len(rule) == 1 and rule[0].text.startswith("rule-built EM (protocol check) before 0.500 ± 0.177 → after")
    rows = page.by_id("summary-targets").find_all("tr", data_target=True)
    assert [r.attrs["data-target"] for r in rows] == list(want["targets"])
    for r in rows:
        t = want["targets"][r.attrs["data-target"]]
        what, value, goal, status = (c.text for c in r.find_all("td"))
        assert what == t["what"] and status == ("not measured yet" if t["value"] is None else
                                                "met" if t["met"] else "missed")
        if t["value"] is not None:
            assert float(value) == pytest.approx(t["value"], abs=1e-3) and float(goal[2:]) == t["target"]


def test_other_metrics_are_grouped_by_namespace_and_collapsed(page, run_dir):
    named = {k for n in page.find_all(cls="chart") if n.attrs.get("data-series")
             for k in n.attrs["data-series"].split(",")}
    groups = page.by_id("other-groups").find_all("details", cls="ns")
    assert groups and [g.attrs["data-ns"] for g in groups] == sorted(g.attrs["data-ns"] for g in groups)
    assert not [g.attrs["data-ns"] for g in groups if "open" in g.attrs]
    inside = set()
    for g in groups:
        charts = g.find_all(cls="chart")
        assert f"{len(charts)} chart" in g.find_all("summary")[0].text
        for c in charts:
            assert c.attrs["data-series"].split("/")[0] == g.attrs["data-ns"]
            inside.add(c.attrs["data-series"])
    # every logged metric that no fixed panel shows is in exactly one group
    present = {k for r in metric_rows(run_dir) for k, v in r.items() if isinstance(v, int | float)
               and k not in ("step", "iteration", "time")}
    assert inside == present - (named - inside)


def test_axes_fit_their_data(tmp_path):
    """A lone point gets an axis around its value (uPlot's default would span 0-100)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "iteration": 0, "phase": "student",
                                                   "student/reward": 0.25, "custom/speed": 1500.0}) + "\n"
                                       + json.dumps({"step": 4, "iteration": 0, "phase": "examiner",
                                                     "examiner/gate_pass_rate": 0.0}) + "\n")
    url, stop = start_dashboard(run, "127.0.0.1", 0)
    try:
        res = chromium(url, tmp_path / "profile", "--dump-dom", budget_ms=5000)
    finally:
        stop()
    dom = parse(res.stdout)

    def ranges(chart_id):
        node = dom.by_id(chart_id)
        return [[float(v) for v in node.attrs[f"data-{a}-range"].split(",")] for a in ("x", "y")]

    assert ranges("chart-rewards") == [[2.0, 4.0], pytest.approx([0.225, 0.275])]  # 3 ± 1; 0.25 ± 10%
    assert ranges("chart-custom-speed") == [[2.0, 4.0], pytest.approx([1350.0, 1650.0])]
    assert ranges("chart-examiner-gate-pass-rate") == [[3.0, 5.0], pytest.approx([-0.5, 0.5])]
    assert "open" not in dom.by_id("ns-custom").attrs


def test_solve_rate_distribution_per_iteration(page, run_dir):
    per_iter: dict[int, int] = {}
    for r in metric_rows(run_dir):
        if isinstance(r.get("examiner/solve_rate_hist"), list):
            per_iter[r["iteration"]] = per_iter.get(r["iteration"], 0) + len(r["examiner/solve_rate_hist"])
    table = page.by_id("solve-hist")
    rows = table.find_all("tr", data_iteration=True)
    assert [int(r.attrs["data-iteration"]) for r in rows] == sorted(per_iter)
    for r in rows:
        counts = [int(c.attrs["data-count"]) for c in r.find_all("td", cls="cell")]
        assert len(counts) == 6 and sum(counts) == per_iter[int(r.attrs["data-iteration"])]


def test_actor_health_table(page, run_dir):
    health = json.loads((run_dir / "health.json").read_text())["actors"]
    rows = page.by_id("health").find_all("tr", data_actor=True)
    assert sorted(r.attrs["data-actor"] for r in rows) == sorted(health)
    for r in rows:
        cells = [c.text for c in r.find_all("td")]
        a = health[r.attrs["data-actor"]]
        assert cells[1] == ("alive" if a["alive"] else "dead") and cells[2] == str(a["restarts"])
        assert cells[3] == (a["last_error"] or "")


def test_task_browser_shows_qcp_and_kl_coloured_trajectory(page, run_dir):
    detail = page.by_id("task-detail")
    task_id = detail.attrs["data-task"]
    assert page.by_id("task-list").find_all("li", data_task=task_id)
    hops = detail.find_all("li", cls="qcp-hop")
    assert hops, "no QCP shown"
    trajs = detail.find_all(cls="traj")
    assert trajs, "no student trajectory shown"
    toks = trajs[0].find_all("span", cls="tok")
    coloured = [t for t in toks if "data-kl" in t.attrs]
    env = [t for t in toks if "env" in t.attrs["class"].split()]
    assert coloured and env  # model tokens carry KL; retrieved text is marked, uncoloured
    # more teacher-student disagreement -> a stronger colour
    alphas = sorted((float(t.attrs["data-kl"]), float(t.attrs["style"].split(",")[-1].rstrip(");"))) for t in coloured)
    assert all(a1 <= a2 + 1e-9 for (_, a1), (_, a2) in zip(alphas, alphas[1:], strict=False))
    assert alphas[-1][1] > alphas[0][1]
    if not os.environ.get("PIPLAY_DASHBOARD_RUN_DIR"):
        # the page shows exactly what the sample file holds, token for token
        recs = [json.loads(x) for f in sorted((run_dir / "samples").glob("student-*.jsonl"))
                for x in f.read_text().splitlines()]
        rec = next(r for r in recs if r["task"]["id"] == task_id)
        assert [h.find_all(cls="query")[0].text for h in hops] == [h["query"] for h in rec["task"]["qcp"]]
        assert "".join(t.text for t in toks) == "".join(rec["tokens"])


# Allows inline scripts and event handlers, so the page's own escaping is the only defence under test.
LAX_CSP = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src * data:"


@pytest.fixture
def url_without_csp(run_dir, monkeypatch):
    monkeypatch.setattr(dashboard_server, "CSP", LAX_CSP)
    u, stop = start_dashboard(run_dir, "127.0.0.1", 0)
    yield u
    stop()


def test_model_text_renders_as_text(url_without_csp, tmp_path_factory):
    """Model text with markup stays text; checked with the CSP relaxed, so a page that inserted it as HTML
    would run its `onerror` (the title becomes PWNED) and grow an <img>."""
    if os.environ.get("PIPLAY_DASHBOARD_RUN_DIR"):
        pytest.skip("the XSS payload lives in the fixture run")
    res = chromium(url_without_csp + f"#task={XSS_TASK_ID}", tmp_path_factory.mktemp("profile"), "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    dom = parse(res.stdout)
    detail = dom.by_id("task-detail")
    assert detail.attrs["data-task"] == XSS_TASK_ID
    assert XSS_TEXT in detail.find_all(cls="question")[0].text
    assert detail.find_all(cls="answer")[0].text == XSS_TEXT
    assert detail.find_all(cls="query")[0].text == XSS_TEXT
    assert detail.find_all(cls="traj-answer")[0].text == XSS_TEXT
    assert XSS_TEXT in "".join(t.text for t in detail.find_all("span", cls="tok"))
    assert XSS_TEXT in dom.by_id("health").text
    # nothing of the payload became markup or ran
    assert not dom.find_all("img")
    assert not [n.tag for n in dom.iter() if any(k.startswith("on") for k in n.attrs)]  # no inline handlers
    assert [s.attrs.get("src") for s in dom.find_all("script")] == ["/static/uPlot.iife.min.js", "/static/app.js"]
    assert "PWNED" not in dom.find_all("title")[0].text


def test_screenshot_artifact(url, tmp_path_factory):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    res = chromium(url, tmp_path_factory.mktemp("profile"), f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = pytest.importorskip("PIL.Image", reason="Pillow checks the screenshot's pixels").open(shot)
    assert image.size == (1400, 3400)
    # the charts' first series colour (#2f6fdf) was actually painted on the canvases
    blue = sum(n for n, (r, g, b) in image.convert("RGB").getcolors(1 << 24)
               if abs(r - 0x2F) < 24 and abs(g - 0x6F) < 24 and abs(b - 0xDF) < 24)
    assert blue > 500, f"only {blue} series-coloured pixels in {shot}"


# ---------------------------------------------------------------------------------------- live updates


class Cdp:
    """A minimal Chrome DevTools Protocol client over one page target."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def eval(self, expr: str):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expr)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {expr}")


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1400,2000", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1) and time.time() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        from websockets.sync.client import connect

        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20) as ws:
            yield Cdp(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_page_updates_live(browser, tmp_path):
    run = tmp_path / "run"
    write_run(run, iterations=1, steps_per_phase=2)
    url, stop = start_dashboard(run, "127.0.0.1", 0)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=url)
        points = "Number(document.getElementById('chart-rewards').dataset.points || 0)"
        before = browser.wait_for(points)
        # the health table comes from its own request: wait for it (it can land after the charts)
        assert browser.wait_for("document.querySelectorAll('#health tr[data-actor]').length === 3", timeout=15)
        # the driver logs another student step and an actor dies: the open page picks both up by polling
        sink = MetricsSink(run, LoggingConfig(tensorboard=False))
        sink.log({"student/reward": 0.9, "student/em": 0.875}, iteration=1, phase="student", step=99)
        sink.write_health({"learner": {"alive": False, "restarts": 1, "last_error": "gloo timeout"}})
        sink.close()
        assert browser.wait_for(f"{points} === {before + 2}", timeout=15)
        assert browser.wait_for("(document.querySelector('#health tr[data-actor=\"learner\"]') || {}).textContent"
                                " === 'learnerdead1gloo timeout'", timeout=15)
        assert "step 99" in browser.eval("document.getElementById('status').textContent")
        # a new evaluation reaches the summary at the top without a reload
        (run / "eval" / "iter-7").mkdir(parents=True)
        (run / "eval" / "iter-7" / "metrics.json").write_text(json.dumps(
            {"summary": {"overall": {"em": 0.875, "n": 16, "invalid": 0.0, "searches": 2.0}}}))
        assert browser.wait_for("document.getElementById('summary-em').dataset.after === '0.875'", timeout=15)
        assert "0.875 ± 0.083" in browser.eval("document.getElementById('summary-em').textContent")
        # opening a collapsed group lays its charts out at the width of their cells
        assert browser.eval("document.getElementById('ns-tasks').open") is False
        browser.eval("document.querySelector('#ns-tasks > summary').click()")
        width = ("(() => { const n = document.querySelector('#ns-tasks .chart'); "
                 "return n.clientWidth > 400 && state.charts.get(n.id).plot.width === n.clientWidth - 4; })()")
        assert browser.wait_for(width, timeout=10)
        # and no model text ever executed as script
        assert browser.eval("typeof window.__pwned") == "undefined"
    finally:
        stop()


def test_a_run_with_nothing_logged_yet(tmp_path):
    (tmp_path / "run").mkdir()
    url, stop = start_dashboard(tmp_path / "run", "127.0.0.1", 0)
    try:
        res = chromium(url, tmp_path / "profile", "--dump-dom", budget_ms=5000)
    finally:
        stop()
    dom = parse(res.stdout)
    charts = [n for n in dom.find_all(cls="chart") if n.attrs.get("data-series")]
    assert charts and all(c.attrs["data-points"] == "0" and "nodata" in c.attrs["class"] for c in charts)
    assert dom.by_id("status").text.startswith("live · no metrics yet")
    assert dom.by_id("task-detail").text == "no tasks yet"
    assert dom.by_id("solve-hist").text == "no solve rates yet"
