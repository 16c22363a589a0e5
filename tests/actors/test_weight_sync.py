"""Weight bundles: bucket packing is lossless for every dtype, and the object-store bundle crosses actors."""

import pytest
import ray
import torch

from piplay_ray.weight_sync import make_transport, pack_buckets, unpack_bucket
from piplay_ray.weight_sync.base import BucketRing


def _named():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(33, 17, generator=g)),
            ("b.bias", torch.randn(5, generator=g).to(torch.bfloat16)),
            ("c.scale", torch.randn(3, 4, 2, generator=g).to(torch.float16)),
            ("d.index", torch.arange(7, dtype=torch.int64)),
            ("e.big", torch.randn(300, generator=g)),  # 1200 bytes: larger than the bucket, travels alone
            ("f.scalar", torch.tensor(2.5))]


def test_pack_unpack_is_exact_and_bucketed():
    named = _named()
    buckets = list(pack_buckets(named, bucket_bytes=1024))
    assert len(buckets) >= 3
    for buf, specs in buckets:
        assert buf.dtype == torch.uint8 and all(s.offset % 64 == 0 for s in specs)
    out = [x for buf, specs in buckets for x in unpack_bucket(buf, specs)]
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, a), (_, b) in zip(named, out, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_unknown_transport_is_a_clear_error():
    with pytest.raises(ValueError, match="object_store"):
        make_transport("carrier-pigeon")


@ray.remote(num_cpus=0)
class Receiver:
    def load(self, version, weights):
        return version, {n: t.clone() for n, t in weights.named_tensors()}


def test_object_store_bundle_reaches_two_actors(ray_local):
    named = _named()
    bundle = make_transport("object_store", bucket_mb=1).publish(7, iter(named))
    assert bundle.version == 7 and len(bundle.refs) == 1
    assert bundle.nbytes == sum(t.numel() * t.element_size() for _, t in named)
    receivers = [Receiver.remote() for _ in range(2)]
    for version, got in ray.get([r.load.remote(bundle.version, bundle) for r in receivers]):
        assert version == 7 and list(got) == [n for n, _ in named]
        for name, t in named:
            assert torch.equal(got[name], t)


class _Work:
    """A transfer in flight: done only once waited on (what NCCL's asynchronous works look like)."""

    def __init__(self):
        self.done = False

    def wait(self):
        self.done = True


def test_a_ring_reuses_at_most_its_slots_and_only_after_their_transfer_is_done():
    named = [(f"t{i}", torch.full((200,), float(i))) for i in range(12)]  # 800 B each: one per 1 KiB bucket
    ring = BucketRing(slots=2)
    storages, works = set(), []
    for buf, specs in pack_buckets(named, 1024, ring):
        # the slot handed out again must have finished its previous transfer
        assert all(w.done for w in works[:-1]), "a slot was reused while its transfer was in flight"
        storages.add(buf.untyped_storage().data_ptr())
        (name, t), = unpack_bucket(buf, specs)
        assert torch.equal(t, dict(named)[name])
        works.append(_Work())
        ring.sent(works[-1])
    ring.flush()
    assert len(storages) == 2 and all(w.done for w in works)
    assert ring.peak == 2 * 832  # two buffers of one bucket each (800 B aligned to 64), never more
    ring.release()
    assert all(b is None for b in ring._bufs)  # nothing kept after the sync


def test_a_tensor_larger_than_a_bucket_travels_as_itself_not_as_a_copy():
    big, small = torch.randn(1000), torch.randn(10)  # 4000 B > the 1 KiB bucket
    out = list(pack_buckets([("small", small), ("big", big), ("small2", small)], 1024, BucketRing(slots=2)))
    assert [[s.name for s in specs] for _, specs in out] == [["small"], ["big"], ["small2"]]
    buf, specs = out[1]
    assert buf.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
    assert torch.equal(dict(unpack_bucket(buf, specs))["big"], big)
