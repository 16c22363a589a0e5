"""The retrieval server under load: N parallel clients on loopback against a tiny BM25 index.

Every client connects at once (a barrier) and sends `--rounds` keep-alive requests; answers are compared
with the in-process retriever. Then one request of 20,000 queries × topk 50 (over the limits) is timed; then
`--slow` clients that trickle a request's header a byte every 4 s, and a normal request beside them; then one
10 MB query, and a normal request sent while it is being served.
Prints one JSON line: {"bench": "retrieval_server", "clients", "requests_ok", "wrong", "resets", "errors",
"seconds", "requests_per_s", "oversized_status", "oversized_refused_ms", "slow_clients",
"normal_beside_slow_ms", "big_query_ms", "normal_beside_big_ms"}.

    python bench/retrieval_server.py [--clients 200] [--rounds 3] [--slow 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

from piplay_ray.retrieval.bm25 import BM25Retriever
from piplay_ray.retrieval.server import RetrievalServer

TOPICS = ["river", "mountain", "comet", "violin", "glacier", "harbor", "orchid", "falcon"]


def tiny_retriever(root: Path) -> BM25Retriever:
    rows = [{"id": str(i), "title": f"{t} {i}", "contents": f"The {t} number {i} is near {TOPICS[i % 5]}."}
            for i, t in enumerate(TOPICS * 4)]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return BM25Retriever(root / "c.jsonl", index_dir=str(root / "index"), max_topk=10)


def load(srv, want, clients: int, rounds: int, timeout_s: float = 60.0) -> dict:
    """`clients` threads connect at once and send `rounds` keep-alive requests each; `want` maps each topic
    to the ids the in-process retriever returns. Counts answers, wrong answers, resets, errors, stuck clients."""
    barrier, lock = threading.Barrier(clients), threading.Lock()
    out = {"requests_ok": 0, "wrong": 0, "resets": 0, "errors": 0}

    def client(i):
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
        barrier.wait()
        try:
            for r in range(rounds):
                q = TOPICS[(i + r) % len(TOPICS)]
                conn.request("POST", "/retrieve", body=json.dumps({"queries": [q], "topk": 3}))
                resp = conn.getresponse()
                got = [d["id"] for d in json.loads(resp.read())["result"][0]]
                with lock:
                    out["requests_ok" if resp.status == 200 and got == want[q] else "wrong"] += 1
                if resp.getheader("Connection") == "close":
                    conn.close()
        except ConnectionResetError:
            with lock:
                out["resets"] += 1
        except Exception as e:  # noqa: BLE001 - counted, the first kept
            with lock:
                out["errors"] += 1
                out.setdefault("first_error", f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max(0.0, t + timeout_s - time.perf_counter()))
    out["stuck"] = sum(th.is_alive() for th in threads)  # clients not done within timeout_s
    out["seconds"] = round(time.perf_counter() - t, 3)
    out["requests_per_s"] = round(out["requests_ok"] / out["seconds"], 1)
    return out


def timed_request(srv, body: bytes, timeout_s: float = 60.0) -> tuple[int, float]:
    """(status, milliseconds) of one POST /retrieve on a new connection."""
    t = time.perf_counter()
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=timeout_s)
    try:
        conn.request("POST", "/retrieve", body=body)
        resp = conn.getresponse()
        resp.read()
        return resp.status, round((time.perf_counter() - t) * 1e3, 1)
    finally:
        conn.close()


def slow_clients(srv, n: int, interval_s: float = 4.0) -> threading.Event:
    """`n` connections that send a request's header one byte every `interval_s` until the returned event is set
    (or the server drops them)."""
    stop = threading.Event()
    head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n"

    def trickle():
        with socket.create_connection(srv.server_address[:2], timeout=60) as s:
            for b in head:
                if stop.wait(interval_s):
                    return
                try:
                    s.sendall(bytes([b]))
                except OSError:  # dropped by the server's deadline
                    return

    for _ in range(n):
        threading.Thread(target=trickle, daemon=True).start()
    time.sleep(0.5)  # all connected and holding their connections
    return stop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slow", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        retriever = tiny_retriever(Path(d))
        want = {t: [x.id for x in docs] for t, docs in zip(TOPICS, retriever.search(TOPICS, 3), strict=True)}
        srv = RetrievalServer(retriever, "127.0.0.1", 0)
        srv.start()
        try:
            res = {"bench": "retrieval_server", "clients": args.clients, "rounds": args.rounds,
                   **load(srv, want, args.clients, args.rounds)}
            body = json.dumps({"queries": ["river"] * 20_000, "topk": 50}).encode()
            res["oversized_status"], res["oversized_refused_ms"] = timed_request(srv, body)
            normal = json.dumps({"queries": ["falcon"], "topk": 3}).encode()
            stop = slow_clients(srv, args.slow)
            res["slow_clients"] = args.slow
            _, res["normal_beside_slow_ms"] = timed_request(srv, normal)
            stop.set()
            big = json.dumps({"queries": ["river " * 1_700_000], "topk": 3}).encode()  # ~10 MB of query
            beside: dict = {}
            thread = threading.Thread(target=lambda: beside.update(big=timed_request(srv, big)))
            thread.start()
            time.sleep(0.05)
            _, res["normal_beside_big_ms"] = timed_request(srv, normal)
            thread.join()
            res["big_query_ms"] = beside["big"][1]
        finally:
            srv.shutdown()
            srv.server_close()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
