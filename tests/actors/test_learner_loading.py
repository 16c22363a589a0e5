"""ZeRO-3 ranks load their partitions, not the whole model (learner/role_engine.load_model): on two CPU ranks
(real Ray actors, DeepSpeed, gloo), each rank's own memory while it loads a bfloat16 checkpoint into the
float32 model it trains (as for Qwen3's bfloat16 checkpoints on CPU) rises by less than the float32 model's
size, and the weights gathered back are the checkpoint's exactly. Loaded whole, every rank held it all."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.learner import learner_config

from piplay_ray.learner.learner import LearnerGroup

RAY_CPUS = 3


@pytest.fixture(scope="module")
def freed_memory_returned():
    """Ranks whose freed large blocks go back to the OS at once (glibc keeps them otherwise, and a freed
    parameter would still count as held); set before the module's Ray starts, which its workers inherit."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def wide_model(tiny_model, tmp_path_factory):
    """The tiny model's tokenizer on a random Llama of ~95M parameters, saved in bfloat16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("wide-model")
    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.update({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 6, "num_attention_heads": 16,
                "num_key_value_heads": 4, "head_dim": 64, "tie_word_embeddings": False})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    for f in tiny_model_files(tiny_model):
        shutil.copy(f, path)
    return str(path)


def tiny_model_files(tiny_model):
    from pathlib import Path

    return [p for p in Path(tiny_model).iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat"))]


def test_each_zero3_rank_loads_its_partition_not_the_whole_model(freed_memory_returned, ray_local, wide_model):
    from pathlib import Path

    from safetensors.torch import load_file

    saved = load_file(str(next(Path(wide_model).glob("*.safetensors"))))
    full = sum(t.numel() * 4 for t in saved.values())  # the model in float32, as the ranks train it
    group = LearnerGroup(learner_config(wide_model, **{"learner.world_size": 2, "learner.zero_stage": 3}),
                         roles=("student",))
    try:
        peaks = [info["load_rss"]["student"] for info in group.info]
        print(f"peak RSS growth while loading, per rank: {[round(p / 2**20) for p in peaks]} MiB; "
              f"the model: {full / 2**20:.0f} MiB")
        # loaded whole (before), each rank's own memory rose by the whole float32 model at least
        assert max(peaks) < 0.8 * full
        gathered = group.state_dict("student")
        assert set(gathered) == set(saved)
        assert all(torch.equal(gathered[n], saved[n].float()) for n in saved)
    finally:
        group.shutdown()
