"""The GPU memory model (piplay_ray/cluster/gpu_memory.py) against figures computed here, independently of it:
published parameter counts, ZeRO partitioning, the LoRA adapter size and the worked sizing in the header of
configs/cluster/qwen3-8b-lora.yaml; and whether every shipped cluster config fits an 80 GB card."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest

from piplay_ray.cluster import gpu_memory as G
from piplay_ray.cluster.shapes import arch
from piplay_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = sorted((ROOT / "configs" / "cluster").rglob("*.yaml"))  # variants/ included
CARD = 80e9
# the Qwen3 model cards: total and non-embedding parameters
PUBLISHED = {"Qwen/Qwen3-0.6B": (0.6e9, 0.44e9), "Qwen/Qwen3-1.7B": (1.7e9, 1.4e9),
             "Qwen/Qwen3-4B": (4.02e9, 3.6e9), "Qwen/Qwen3-8B": (8.19e9, 6.95e9)}
P8 = 8.19e9


@functools.cache
def cfg(name: str, *overrides: str):
    return load_config(ROOT / "configs" / "cluster" / f"{name}.yaml", list(overrides))


def actor(c, name: str) -> G.ActorMemory:
    return next(m for m in G.actors(c) if m.name == name)


def states(m: G.ActorMemory) -> float:
    return m.parts["weights"] + m.parts["grads"] + m.parts["optimizer"]


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(model):
    total, non_embedding = PUBLISHED[model]
    a = arch(model)
    embeddings = a.vocab * a.hidden * (1 if a.tied else 2)
    assert a.params == pytest.approx(total, rel=0.02)
    # the model cards round non-embedding counts to 2 digits (0.44B, 1.4B): 3% covers the rounding
    assert a.params - embeddings == pytest.approx(non_embedding, rel=0.03)


def test_an_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'Qwen/Qwen3-14B'.*Qwen/Qwen3-8B"):
        G.actors(cfg("qwen3-8b", "model.base=Qwen/Qwen3-14B"))
    folder = tmp_path / "m"  # a local model folder is read from its config.json
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288, '
                                        '"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, '
                                        '"vocab_size": 151936, "tie_word_embeddings": false}')
    assert arch(str(folder)) == arch("Qwen/Qwen3-8B")


@pytest.mark.parametrize("stage,scaled", [(3, ("weights", "grads", "optimizer")), (2, ("grads", "optimizer")),
                                          (1, ("optimizer",)), (0, ())])
def test_zero_partitions_states_over_the_ranks(stage, scaled):
    """Full fine-tuning, idle role offloaded: the active role's 16 B per parameter and the idle role's 2 B of
    weights (offloading keeps them for publishing), the scaled parts / N."""
    per = {"weights": 2, "grads": 2, "optimizer": 12}
    for n in (2, 4, 8):
        m = actor(cfg("qwen3-8b", f"learner.world_size={n}", f"learner.zero_stage={stage}"), "learner-1")
        for part, b in per.items():
            # stage 0 offloads nothing (DeepSpeed cannot): both roles stay; weights always do
            roles = 2 if stage == 0 or part == "weights" else 1
            assert m.parts[part] == pytest.approx(roles * b * P8 / (n if part in scaled else 1), rel=0.02), (n, part)
    if stage == 3:
        assert states(actor(cfg("qwen3-8b", "learner.world_size=2"), "learner-1")) == pytest.approx(
            4 * states(actor(cfg("qwen3-8b", "learner.world_size=8"), "learner-1")))
        # the header of qwen3-8b-lora.yaml: without LoRA, 2 ranks hold (2 + 2 + 12) B x P / 2 = 66 GB each of
        # the active role, + the idle role's weights (2 B x P / 2)
        assert states(actor(cfg("qwen3-8b-lora", "learner.lora.rank=0"), "learner-1")) == pytest.approx(
            66e9 + P8, rel=0.02)


def test_without_offload_both_roles_stay():
    on, off = (actor(cfg("qwen3-8b", f"learner.offload_inactive={v}"), "learner-1") for v in ("true", "false"))
    assert states(off) == pytest.approx(2 * 16 * P8 / 6, rel=0.02)  # both roles' states, ZeRO-3 over 6 ranks
    assert states(off) - states(on) == pytest.approx((2 + 12) * P8 / 6, rel=0.02)  # the idle role's grads, Adam


def test_lora_adapter_of_rank_32_on_qwen3_8b():
    """r x (in + out) per linear: q 4096->4096, k and v 4096->1024, o 4096->4096, gate/up 4096->12288,
    down 12288->4096; 36 blocks (the yaml header's 87.3e6)."""
    per_block = 32 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 12288))
    assert per_block * 36 == pytest.approx(87.3e6, rel=0.001)
    assert arch("Qwen/Qwen3-8B").lora_params(32, ["all-linear"]) == per_block * 36
    assert arch("Qwen/Qwen3-8B").lora_params(32, ["q_proj", "v_proj"]) == 32 * 36 * (8192 + 5120)


def test_the_lora_config_header_is_reproduced():
    """configs/cluster/qwen3-8b-lora.yaml's sizing: a learner rank ~34 GB over 2 ranks (~51 GB on 1), of it
    activations + loss logits ~9 GB; a TP 1 engine ~47 GB of KV cache, ~320k tokens of 147 KB. The model
    lands within 5% of each (it keeps the idle adapter's states in host memory, which the header does not)."""
    c = cfg("qwen3-8b-lora")
    rank = actor(c, "learner-1")
    assert rank.total == pytest.approx(34e9, rel=0.05)
    assert rank.parts["weights"] == pytest.approx(2 * P8 * 2 / 2, rel=0.02)  # both roles' frozen bf16 bases / 2
    assert rank.parts["activations"] + rank.parts["logits"] == pytest.approx(9e9, rel=0.05)
    assert actor(cfg("qwen3-8b-lora", "learner.world_size=1"), "learner-0").total == pytest.approx(51e9, rel=0.05)
    engine = actor(c, "rollout-student-0")
    assert engine.parts["weights"] == pytest.approx(2 * P8, rel=0.03)
    assert engine.parts["kv_cache"] == pytest.approx(47e9, rel=0.05)
    assert arch("Qwen/Qwen3-8B").kv_bytes_per_token == 36 * 2 * 8 * 128 * 2
    assert engine.kv_tokens == pytest.approx(320e3, rel=0.05)
    # what the weight sync moves: the adapter only (~175 MB in bf16), received into one buffer
    assert engine.parts["weight_sync"] == pytest.approx(175e6, rel=0.02)


def test_the_teacher_pays_for_prompt_logprobs_outside_vllms_share():
    c = cfg("qwen3-8b")
    teacher, engine = actor(c, "teacher"), actor(c, "rollout-student-0")
    assert teacher.parts["logits"] == pytest.approx(8192 * 151936 * (2 + 4))  # bf16 logits + fp32 log-softmax
    assert "logits" not in engine.parts
    # TP 2: each GPU holds half the weights and half of every token's KV heads
    assert engine.parts["weights"] == pytest.approx(P8, rel=0.02)
    assert engine.kv_tokens == pytest.approx(engine.parts["kv_cache"] / (36 * 2 * 8 * 128 * 2 / 2), abs=1)
    # inside the share: weights + activations + non-torch + KV = gpu_memory_utilization x card
    inside = engine.total - engine.parts["weight_sync"] - G.VLLM_OUTSIDE
    assert inside == pytest.approx(0.85 * CARD)
    # teacher.backend=shared: no teacher actor; the student's engines score instead
    shared = cfg("qwen3-8b-lora", "teacher.backend=shared")
    assert "teacher" not in [m.name for m in G.actors(shared)]
    assert "logits" in actor(shared, "rollout-student-0").parts and "logits" not in actor(shared, "rollout-examiner-0").parts


def test_the_deepspeed_settings_the_model_assumes():
    """gathered = DeepSpeed's default stage3_max_live_parameters (1e9) and the 5e7-element buckets."""
    text = (ROOT / "piplay_ray" / "learner" / "role_engine.py").read_text()
    assert "stage3_max_live_parameters" not in text and '"reduce_bucket_size": 5e7' in text
    assert actor(cfg("qwen3-8b"), "learner-1").parts["gathered"] == pytest.approx(2 * (1e9 + 2 * 5e7))


def shipped_actors():
    out = []
    for path in CLUSTER:
        for m in G.actors(load_config(path)):
            name = path.relative_to(ROOT / "configs" / "cluster").with_suffix("").as_posix()
            out.append(pytest.param(name, m.name, id=f"{name}:{m.name}"))
    return out


@pytest.mark.parametrize("config,name", shipped_actors())
def test_every_shipped_cluster_actor_fits_an_80gb_card_with_10_percent_headroom(config, name):
    m = actor(cfg(config), name)
    assert m.card == CARD
    assert m.problems(0.10) == [] and m.total <= 0.9 * CARD, m.to_dict()


def test_the_shipped_configs_with_gpus_are_all_checked():
    assert {p.stem for p in CLUSTER if G.actors(load_config(p))} == {"qwen3-4b", "qwen3-8b", "qwen3-8b-lora",
                                                                   "qwen3-4b-instruct"}


def test_an_absurd_micro_batch_or_a_small_share_does_not_fit():
    assert G.problems(cfg("qwen3-8b"), 80.0, 0.0) == []  # shipped: every actor within the card
    bad = G.problems(cfg("qwen3-8b", f"learner.micro_batch_tokens={10**7}"), 80.0, 0.0)
    assert len(bad) == 6 and all(p.startswith("learner-") for p in bad)
    assert actor(cfg("qwen3-8b", f"learner.micro_batch_tokens={10**7}"), "learner-1").headroom < 0
    # without gradient checkpointing every block's activations stay: 36 x 8192 x ~94k values x 2 B ~ 56 GB more
    no_ckpt = actor(cfg("qwen3-8b", "learner.gradient_checkpointing=false"), "learner-1")
    assert no_ckpt.parts["activations"] == pytest.approx(36 * 8192 * 94208 * 2 + 2 * 8192 * 4096 * 2)
    # a vLLM share too small for the weights leaves no KV cache: it cannot hold rollout.max_model_len
    small = G.problems(cfg("qwen3-8b-lora", "rollout.gpu_memory_utilization=0.25"), 80.0)
    assert any("rollout-student-0: its KV cache holds 0 tokens" in p for p in small)
    # a bigger card fits what an 80 GB card does not
    assert not G.problems(cfg("qwen3-8b", f"learner.micro_batch_tokens={2**17}"), 141.0, 0.0)
    assert G.problems(cfg("qwen3-8b", f"learner.micro_batch_tokens={2**17}"), 80.0, 0.0)


def test_report_is_json_and_the_command_prints_a_table(capsys):
    rows = G.report(cfg("qwen3-8b-lora"))
    assert [r["name"] for r in rows][:2] == ["learner-0", "learner-1"] and rows[-1]["name"] == "teacher"
    assert rows[0]["total"] == pytest.approx(sum(v for k, v in rows[0].items() if k in G.COLUMNS
                                                 and k not in ("total", "card", "headroom", "kv_tokens")), abs=0.05)
    path = str(ROOT / "configs" / "cluster" / "qwen3-8b-lora.yaml")
    assert G.main([path, "--min-headroom", "0.0"]) == 0
    out = capsys.readouterr().out
    assert "rollout-student-1" in out and "fits" in out
    assert G.main([path]) == 0  # every actor keeps 10%
    capsys.readouterr()
    assert G.main([path, "teacher.gpu_memory_utilization=0.85"]) == 1  # the logits outside vLLM's share
    assert "teacher:" in capsys.readouterr().out
    assert G.main([path, "model.base=Qwen/Qwen3-14B"]) == 2 and "unknown model" in capsys.readouterr().err
    assert G.main([path, "learner.nope=1"]) == 2 and "learner.nope" in capsys.readouterr().err


def test_importing_the_model_loads_no_torch_or_ray():
    code = ("import sys, piplay_ray.cluster.gpu_memory; "
            "print([m for m in ('torch', 'ray', 'deepspeed', 'vllm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_one_gpu_config_fits_one_card_colocated_and_syncs_by_ipc():
    """configs/gpu1.yaml: every actor within its share with 10% spare, the shares one card together (so Ray
    puts them all on it), the learner's states as computed here (16 B x P for the active role, 2 B x P for
    the idle one), and a 4B model that would not fit."""
    from piplay_ray.cluster.layout import layout, sync_transport

    c = load_config(ROOT / "configs" / "gpu1.yaml")
    assert G.problems(c, 80.0, 0.10) == []
    assert sum(m.card for m in G.actors(c)) <= CARD + 1e6
    lay = layout(c)
    assert lay.total_gpus <= 1.0 and sync_transport(c, lay) == "ipc"
    P = arch("Qwen/Qwen3-1.7B").params
    assert states(actor(c, "learner-0")) == pytest.approx(16 * P + 2 * P, rel=1e-6)
    assert G.problems(load_config(ROOT / "configs" / "gpu1.yaml", ["model.base=Qwen/Qwen3-4B"]), 80.0, 0.10)


def test_ipc_only_where_every_actor_shares_one_gpu():
    from piplay_ray.cluster.layout import sync_transport

    assert sync_transport(cfg("qwen3-8b")) == "collective"  # 16 GPUs on two nodes: NCCL
    assert sync_transport(cfg("qwen3-4b", "weight_sync.transport=object_store")) == "object_store"
    local = load_config(ROOT / "configs" / "local.yaml", ["weight_sync.transport=collective"])
    assert sync_transport(local) == "collective"  # no GPU at all: gloo on CPU


def test_the_teachers_float32_ema_sits_on_its_gpu_unless_kept_on_the_host():
    """4 B per parameter beside vLLM's share (Qwen3-8B: 32.8 GB), the adapter's under LoRA, none with
    teacher.ema_on_host; the 8B teacher still fits with 10% spare and a KV cache for whole sequences."""
    t = actor(cfg("qwen3-8b"), "teacher")
    assert t.parts["ema"] == pytest.approx(4 * P8, rel=0.01)
    assert t.problems(0.10) == [] and t.kv_tokens >= 8192
    assert "ema" not in actor(cfg("qwen3-8b", "teacher.ema_on_host=true"), "teacher").parts
    lora = actor(cfg("qwen3-8b-lora"), "teacher").parts["ema"]
    assert lora == pytest.approx(4 * 87.3e6, rel=0.01)  # the header's adapter size
