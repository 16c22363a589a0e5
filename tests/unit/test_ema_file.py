"""The teacher's EMA file, streamed tensor by tensor (teacher/ema.save_ema): safetensors' own reader gets back
every tensor exactly, with its dtype, shape and the version; a write cut short leaves the previous file."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from piplay_ray.teacher import ema


def _master() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"model.embed_tokens.weight": torch.randn(37, 5, generator=g),
            "model.norm.weight": torch.randn(5, generator=g).to(torch.bfloat16),
            "lm_head.scale": torch.tensor(0.25),  # 0-d
            "model.layers.0.mlp.up_proj.weight": torch.randn(3, 7, generator=g).t(),  # not contiguous
            "x.half": torch.randn(2, 3, generator=g).to(torch.float16)}


def test_streamed_file_reads_back_exactly_with_safetensors(tmp_path):
    master = _master()
    path = ema.save_ema(tmp_path, master, version=12)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"version": "12"}
        assert sorted(f.keys()) == sorted(master)
        for name, t in master.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    version, tensors = ema.read_ema(tmp_path)
    assert version == 12 and all(torch.equal(dict(tensors)[n], t) for n, t in master.items())


class _CutShort(dict):
    """Masters whose tensors stop coming after the first (a GPU error, a kill) while the file is written."""

    def values(self):
        yield next(iter(super().values()))
        raise RuntimeError("cut short")


def test_a_write_cut_short_keeps_the_previous_file(tmp_path):
    ema.save_ema(tmp_path, _master(), version=3)
    with pytest.raises(RuntimeError, match="cut short"):
        ema.save_ema(tmp_path, _CutShort(_master()), version=4)
    assert ema.read_ema(tmp_path)[0] == 3
