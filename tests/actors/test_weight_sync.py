"""Weight bundles: bucket packing is lossless for every dtype, and the object-store bundle crosses actors."""

import pytest
import ray
import torch

from piplay_ray.weight_sync import make_transport, pack_buckets, unpack_bucket


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


def test_scratch_memory_is_reused_across_publishes():
    named, scratch = _named(), []
    for _ in range(2):
        out = [(n, t.clone()) for buf, specs in pack_buckets(named, 1024, scratch) for n, t in unpack_bucket(buf, specs)]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named, out, strict=True))
    first = [s.data_ptr() for s in scratch]
    list(pack_buckets(named, 1024, scratch))
    assert [s.data_ptr() for s in scratch] == first
