"""The pushing transports on CPU: collective (gloo) and ipc (its shared-memory twin). Learner rank 0 sends
packed buckets to several receivers in a group built from a TCP store (no default process group), each
gets exactly the sender's tensors; a new generation (new store) lets a restarted receiver rejoin; a
receiver refuses a version its ticket does not name; a sync holds at most two buckets."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time

import pytest
import torch

from piplay_ray.weight_sync import make_transport, receiver_for
from piplay_ray.weight_sync.base import SyncError

KINDS = ["collective", "ipc"]


def _named(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [("a.weight", torch.randn(33, 17, generator=g)),
            ("b.bias", torch.randn(5, generator=g).to(torch.bfloat16)),
            ("c.scale", torch.randn(3, 4, 2, generator=g).to(torch.float16)),
            ("e.big", torch.randn(300, generator=g)),  # larger than the 1 KiB bucket: travels alone
            ("f.scalar", torch.tensor(2.5))]


def _receive(tickets, out):
    rx = None
    for ticket in tickets:
        rx = receiver_for(ticket, "cpu", rx)  # the ticket names the transport
        try:
            # raw bytes, not tensors: a tensor in a queue is a shared fd that dies with this process
            got = {n: (t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                   for n, t in rx.receive(ticket)}
            out.put((ticket["rank"], ticket["version"], got))
        except Exception as e:  # reported to the test, which expects it for a wrong version
            out.put((ticket["rank"], ticket["version"], repr(e)))


def _tensor(raw) -> torch.Tensor:
    dtype, shape, data = raw
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _host() -> str:
    return "127.0.0.1"


def _sender(kind: str, bucket_bytes: int = 1024):
    tx = make_transport(kind, bucket_mb=1)
    tx.bucket_bytes = bucket_bytes
    return tx


@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_reaches_every_receiver_exactly(kind):
    ctx = mp.get_context("spawn")
    tx = _sender(kind)
    rdv = tx.open(_host(), world=3, generation=1, timeout_s=60)
    out = ctx.Queue()
    procs = [ctx.Process(target=_receive, args=([rdv.ticket(r, 4), rdv.ticket(r, 5)], out)) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        for version in (4, 5):
            receipt = tx.publish(version, iter(_named(version)))
            assert receipt.version == version and receipt.generation == 1
            assert receipt.nbytes == sum(t.numel() * t.element_size() for _, t in _named(version))
        results = [out.get(timeout=60) for _ in range(4)]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert sorted((r, v) for r, v, _ in results) == [(1, 4), (1, 5), (2, 4), (2, 5)]
    for _, version, got in results:
        want = _named(version)
        assert list(got) == [n for n, _ in want]
        for name, t in want:
            assert got[name][0] == t.dtype and torch.equal(_tensor(got[name]), t)


@pytest.mark.parametrize("kind", KINDS)
def test_new_generation_lets_a_restarted_receiver_rejoin_and_versions_are_checked(kind):
    ctx = mp.get_context("spawn")
    tx = _sender(kind)
    out = ctx.Queue()
    rdv1 = tx.open(_host(), world=2, generation=1, timeout_s=60)
    p = ctx.Process(target=_receive, args=([rdv1.ticket(1, 1)], out))
    p.start()
    tx.publish(1, iter(_named(1)))
    assert out.get(timeout=60)[1] == 1
    p.join(timeout=30)  # the receiver is gone: a fresh process joins a new generation
    rdv2 = tx.open(_host(), world=2, generation=2, timeout_s=60)
    assert rdv2.port != rdv1.port or rdv2.generation != rdv1.generation
    p = ctx.Process(target=_receive, args=([rdv2.ticket(1, 2), rdv2.ticket(1, 9)], out))
    p.start()
    try:
        tx.publish(2, iter(_named(2)))
        rank, version, got = out.get(timeout=60)
        assert version == 2 and torch.equal(_tensor(got["a.weight"]), _named(2)[0][1])
        with pytest.raises(RuntimeError):  # the receiver wanted 9 and leaves: the send fails, never hangs
            tx.publish(3, iter(_named(3)))
        assert "expected 9" in out.get(timeout=60)[2]
    finally:
        p.join(timeout=30)


@pytest.mark.parametrize("kind", KINDS)
def test_unopened_pushing_transport_refuses_to_publish(kind):
    with pytest.raises(RuntimeError, match="open"):
        make_transport(kind).publish(1, iter(_named(0)))


MB = 1 << 20


def _peak_rss_reset() -> int:
    """Reset this process's peak RSS (Linux: clear_refs 5) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _digest(t: torch.Tensor) -> str:
    """The tensor's exact bytes, hashed in place (no copy: the measured memory stays the transport's)."""
    return hashlib.sha256(t.numpy().data).hexdigest()


def _receive_and_measure(warm, ticket, out):
    rx = receiver_for(ticket, "cpu")
    rx.drain(warm)  # the group's connections, threads and first buffers exist before the measured sync
    base = _peak_rss_reset()
    sums = {n: _digest(t) for n, t in rx.receive(ticket)}  # consumed in place, nothing kept
    out.put((sums, _status("VmHWM") - base, rx.peak))


@pytest.mark.parametrize("kind", KINDS)
def test_a_sync_holds_at_most_two_buckets_on_either_side_and_nothing_after(kind):
    """Measured from outside the ring (the processes' peak RSS): 32 tensors of 4 MiB in 4 MiB buckets. A
    sender that kept a buffer per bucket (as before) would add the whole 128 MiB model; the ring adds two
    buckets, the receiver one. Measured on a second sync of the group, after a warm-up one."""
    named = [(f"layer{i}.weight", torch.randn(MB)) for i in range(32)]  # 4 MiB each, pages touched
    ctx = mp.get_context("spawn")
    tx = make_transport(kind, bucket_mb=4)
    rdv = tx.open(_host(), world=2, generation=1, timeout_s=60)
    out = ctx.Queue()
    p = ctx.Process(target=_receive_and_measure, args=(rdv.ticket(1, 0), rdv.ticket(1, 1), out))
    p.start()
    try:
        tx.publish(0, iter(named[:2]))  # warm-up: what joining costs is not the sync's buffers
        base = _peak_rss_reset()
        receipt = tx.publish(1, iter(named))
        sent_peak = _status("VmHWM") - base
        sums, received_peak, rx_ring = out.get(timeout=120)
    finally:
        p.join(timeout=30)
    assert sums == {n: _digest(t) for n, t in named}
    bucket = 4 * MB + 64  # a 4 MiB tensor plus alignment does not fit a 4 MiB bucket with another
    print(f"{kind}: peak RSS growth in a sync: sender {sent_peak / MB:.1f} MiB, receiver {received_peak / MB:.1f} MiB")
    mapped = 2 if kind == "ipc" else 1  # an ipc receiver maps the sender's two buffers, holds none of its own
    assert receipt.meta["buffer_peak"] <= 2 * bucket and rx_ring <= mapped * bucket
    assert sent_peak < 4 * bucket, f"the sender's RSS grew {sent_peak / MB:.0f} MiB for a 128 MiB model"
    assert received_peak < 3 * bucket, f"the receiver's RSS grew {received_peak / MB:.0f} MiB"
    assert not [v for v in vars(tx).values() if isinstance(v, torch.Tensor) or v and isinstance(v, list)
                and isinstance(v[0], torch.Tensor)]  # no buffer outlives the sync
    assert not _segments()  # ipc: every shared-memory bucket is unlinked


def _segments() -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"piplay-ipc-{os.getpid()}-")]


def _receive_then_die(ticket, after):
    rx = receiver_for(ticket, "cpu")
    for i, _ in enumerate(rx.receive(ticket)):
        if i == after:
            os._exit(3)


def test_ipc_a_receiver_that_dies_mid_sync_fails_the_sender_within_the_timeout_and_leaves_no_segment():
    """The ipc sender waits for every receiver's acknowledgement before reusing a bucket: a receiver that
    dies while copying one must not leave it waiting past the group's timeout, nor leave shared memory."""
    ctx = mp.get_context("spawn")
    tx = _sender("ipc")
    rdv = tx.open(_host(), world=3, generation=1, timeout_s=20)  # the rendezvous waits for two spawns
    out = ctx.Queue()  # kept: the child opens it after this function moved on
    alive = ctx.Process(target=_receive, args=([rdv.ticket(1, 1)], out))
    dying = ctx.Process(target=_receive_then_die, args=(rdv.ticket(2, 1), 1))
    for p in (alive, dying):
        p.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(SyncError):
            tx.publish(1, iter(_named(1)))
        assert time.monotonic() - t0 < 2 * 20  # the spawns, then at most the timeout
    finally:
        for p in (alive, dying):
            p.join(timeout=30)
    assert dying.exitcode == 3  # it died mid-sync, after its first tensor
    assert not _segments()


def _receive_slowly(ticket, out):
    """Reads each tensor a while after it arrived: a sender that reused a bucket's buffer before every
    receiver said it was done would have overwritten it by then."""
    rx = receiver_for(ticket, "cpu")
    got = {}
    for name, t in rx.receive(ticket):
        time.sleep(0.05)
        got[name] = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    out.put(got)


def test_ipc_a_bucket_is_reused_only_after_every_receiver_took_it():
    named = [(f"w{i}", torch.full((256,), float(i))) for i in range(12)]  # 1 KiB each: a bucket each
    ctx = mp.get_context("spawn")
    tx = _sender("ipc", bucket_bytes=1024)
    rdv = tx.open(_host(), world=2, generation=1, timeout_s=60)
    out = ctx.Queue()
    p = ctx.Process(target=_receive_slowly, args=(rdv.ticket(1, 1), out))
    p.start()
    try:
        tx.publish(1, iter(named))
        got = out.get(timeout=60)
    finally:
        p.join(timeout=30)
    assert got == {n: t.numpy().tobytes() for n, t in named}
