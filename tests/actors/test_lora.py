"""LoRA on the learner (`learner.lora`): one real DeepSpeed ZeRO-2 rank in this process (gloo, world size 1,
no Ray), the tiny model, rank-4 adapters on every linear layer.

Every merged weight is checked against W + (alpha/rank)·B·A computed here from the base model on disk and the
adapter PEFT saved; the export against the PEFT model's own logits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from types import SimpleNamespace

import pytest
import torch
from helpers.learner import experience_batch, learner_config
from transformers import AutoModelForCausalLM

from piplay_ray.config import ConfigError
from piplay_ray.learner import lora, role_engine
from piplay_ray.learner.rank import LearnerWorkerImpl, _free_port, rank_args
from piplay_ray.weight_sync.base import Transport, pack_buckets, unpack_bucket

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


@pytest.fixture(scope="module")
def process():
    """The ranks below join a one-rank gloo group in this process; its environment and group are restored after."""
    env = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def _worker(tiny_model, roles=("student",), **over) -> LearnerWorkerImpl:
    cfg = learner_config(tiny_model, **{"learner.lora.rank": RANK, "learner.lora.alpha": ALPHA, "learner.lr": 1e-2, **over})
    w = LearnerWorkerImpl(rank=0, world_size=1, **rank_args(cfg, roles))
    w.info = w.setup("127.0.0.1", _free_port(), 0, 1, [])
    return w


@pytest.fixture(scope="module")
def worker(process, tiny_model):
    """A ZeRO-2 learner rank training the student with LoRA."""
    w = _worker(tiny_model)
    yield w
    w.close()


@pytest.fixture(scope="module")
def base(tiny_model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters()}


@pytest.fixture(scope="module")
def stepped(worker):
    """The adapter before and after one train step (B starts at zero, so a merge before it is trivial)."""
    before = worker.adapter_state("student")
    metrics = worker.train_step("student", experience_batch("student", seed=3, n=4))
    return before, worker.adapter_state("student"), metrics


def _close(a: dict, b: dict, exact: bool = True) -> None:
    assert set(a) == set(b)
    for n in a:
        if not torch.is_tensor(a[n]):
            assert a[n] == b[n], n
        elif exact:
            assert torch.equal(a[n], b[n]), n
        else:
            torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5, msg=n)


def test_config_lora_off_by_default_and_bad_keys_named(tiny_model):
    assert learner_config(tiny_model).learner.lora.rank == 0
    bad = [("learner.lora.rnk", 8, "unknown key"), ("learner.lora.rank", -1, "greater than or equal to 0"),
           ("learner.lora.alpha", 0, "greater than 0"), ("learner.lora.dropout", 1, "less than 1"),
           ("learner.lora.target_modules", "[]", "at least 1 item"), ("learner.lora.target_modules", "['']", "")]
    for key, value, why in bad:
        with pytest.raises(ConfigError, match=f"`{key}(.0)?`: .*{why}"):
            learner_config(tiny_model, **{key: value})


def test_merge_rounds_once_and_follows_the_weight_layout():
    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*s, generator=g) for s in ((6, 5), (3, 5), (6, 3)))
    want = w.double() + 0.5 * b.double() @ a.double()
    torch.testing.assert_close(lora.merge(w, a, b, 0.5).double(), want, atol=1e-6, rtol=0)
    half = lora.merge(w.bfloat16(), a.bfloat16(), b.bfloat16(), 0.5)  # fp32 sum, one rounding to bf16
    ref = (w.bfloat16().float() + 0.5 * b.bfloat16().float() @ a.bfloat16().float()).bfloat16()
    assert half.dtype == torch.bfloat16 and torch.equal(half, ref)
    torch.testing.assert_close(lora.merge(w.T.contiguous(), a, b, 0.5, fan_in_fan_out=True).double(), want.T,
                               atol=1e-6, rtol=0)  # GPT-2's Conv1D stores W as [in, out]
    assert lora.base_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight") == \
        "model.layers.0.mlp.up_proj.weight"


def test_adapter_publish_moves_only_the_adapter(worker, stepped):
    _, after, _ = stepped
    worker.transports[("student", "recording")] = _Recording(bucket_mb=1)
    sent = worker.publish("student", "recording", form="adapter")
    full = worker.publish("student", "recording")
    assert sent.meta == {"role": "student", "form": "adapter",
                         "lora": {"rank": RANK, "alpha": ALPHA, "target_modules": ["all-linear"]}}
    assert full.meta == {"role": "student", "form": "full"}
    _close(dict(sent.tensors), {lora.peft_name(n): t for n, t in after.items()})  # PEFT's saved names
    # the bytes on the wire are the adapter's: 2 layers x (4 attention + 3 MLP) x (A + B) in float32
    per_layer = 4 * RANK * (128 + 128) + 3 * RANK * (128 + 256)
    assert sent.nbytes == 2 * per_layer * 4 == sum(t.numel() * 4 for t in after.values())
    assert full.nbytes == sum(t.numel() * 4 for _, t in full.tensors) and full.nbytes > 40 * sent.nbytes
    with pytest.raises(ValueError, match="form must be full or adapter"):
        worker.publish("student", "recording", form="lora")


def test_engine_after_an_adapter_sync_equals_peft(worker, stepped, tiny_model, tmp_path):
    """The acceptance point: the transformers engine, serving LoRA, takes the trained adapter from the learner's
    sync and scores a fixed sequence exactly as transformers + PEFT loading the checkpoint's adapter."""
    from peft import PeftModel

    from piplay_ray.engines.transformers_engine import TransformersEngine

    lc = worker.learner.lora
    engine = TransformersEngine(tiny_model, dtype="float32", num_threads=1, lora=lc)
    seq = list(range(3, 60, 2))
    base_lp = engine.logprobs_of(seq, 1)
    assert engine.weight_form == "adapter"
    worker.transports[("student", "recording")] = _Recording(bucket_mb=1)
    engine.update_weights(1, worker.publish("student", "recording", form="adapter").tensors)
    assert engine.version == 1
    worker.save(str(tmp_path))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                    str(tmp_path / "student" / lora.ADAPTER_DIR)).eval()
    with torch.no_grad():
        want = torch.log_softmax(ref(input_ids=torch.tensor([seq])).logits[0, :-1].float(), -1)
    got = engine.logprobs_of(seq, 1)
    assert (got - base_lp).abs().max() > 1e-3  # the trained adapter changes the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="not a LoRA matrix"):
        engine.update_weights(2, {"model.norm.weight": torch.ones(128)})
    assert engine.version == 1


def test_only_the_adapter_trains_and_is_in_the_optimizer(worker):
    module = worker.policies["student"].engine.module
    adapter = lora.adapter_parameters(module)
    assert len(adapter) == 2 * 7 * 2  # A and B on 7 linear layers in each of 2 decoder layers
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(adapter)
    opt = worker.policies["student"].engine.optimizer
    in_opt = [p for group in opt.bit16_groups for p in group]  # ZeRO-2: the module parameters it steps
    assert {id(p) for p in in_opt} == {id(p) for p in adapter.values()}
    adapter_numel = sum(p.numel() for p in adapter.values())
    assert sum(p.numel() for p in in_opt) == adapter_numel == 2 * (4 * RANK * (128 + 128) + 3 * RANK * (128 + 256))


def test_a_step_moves_the_adapter_and_not_the_base(worker, stepped, base):
    before, after, metrics = stepped
    assert metrics["version"] == 1 and metrics["grad_norm"] > 0
    for n in before:  # B starts at zero, so the first step moves B only (A's gradient is B-weighted)
        assert torch.equal(before[n], after[n]) == (".lora_A." in n), n
    module = worker.policies["student"].engine.module
    frozen = dict(lora.base_parameters(module))
    assert set(frozen) == set(base)
    for n, t in base.items():
        assert torch.equal(frozen[n].detach(), t), n


def _merged_here(base: dict, adapter: dict) -> dict[str, torch.Tensor]:
    """W + (alpha/rank)·B·A from the base on disk and the adapter under PEFT's saved names."""
    out = dict(base)
    for key, a in adapter.items():
        if ".lora_A." in key:
            layer = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            out[f"{layer}.weight"] = base[f"{layer}.weight"] + SCALE * (b.double() @ a.double()).float()
    return out


def test_merged_weights_are_w_plus_scaled_ba_under_base_names(worker, stepped, base, tmp_path):
    from safetensors.torch import load_file

    worker.save(str(tmp_path))
    adapter = load_file(tmp_path / "student" / lora.ADAPTER_DIR / "adapter_model.safetensors")
    assert len(adapter) == 28 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in adapter)
    merged = worker.state_dict("student")
    expected = _merged_here(base, adapter)
    _close(merged, expected, exact=False)
    assert sum(not torch.equal(merged[n], base[n]) for n in base) == 14  # exactly the adapted weights differ
    worker.transports[("student", "recording")] = _Recording(bucket_mb=1)
    published = worker.publish("student", "recording")  # what a transport packs and a receiver unpacks
    assert published.version == 1
    _close(dict(published.tensors), merged)


class _Recording(Transport):
    """The real bucket packing without Ray: the bundle holds what a receiver would unpack."""

    name = "recording"

    def publish(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> SimpleNamespace:
        buckets = [(buf.clone(), specs) for buf, specs in pack_buckets(named, self.bucket_bytes)]
        return SimpleNamespace(version=version, meta={}, nbytes=sum(s.nbytes for _, specs in buckets for s in specs),
                               tensors=[nt for buf, specs in buckets for nt in unpack_bucket(buf, specs)])


def test_checkpoint_keeps_the_peft_adapter_and_resume_is_exact(worker, stepped, tiny_model, tmp_path):
    from peft import PeftModel

    worker.save(str(tmp_path))
    saved, saved_opt = worker.adapter_state("student"), worker.optimizer_state("student")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                     str(tmp_path / "student" / lora.ADAPTER_DIR))
    _close(lora.adapter_state(peft, lambda ps: contextlib.nullcontext()), saved)  # PEFT itself reads the format
    train_state = tmp_path / "student" / "train_state" / "state"
    assert sum(f.stat().st_size for f in train_state.iterdir()) < 2e6  # adapter + Adam moments, no frozen base
    with pytest.raises(ValueError, match="written with learner.lora"):  # a full run cannot resume it
        lora.check_checkpoint(tmp_path / "student", on=False)
    nxt = experience_batch("student", seed=4, n=4)
    worker.train_step("student", nxt)
    once = worker.adapter_state("student")
    assert not any(torch.equal(once[n], saved[n]) for n in saved)  # now A moves too
    assert worker.load(str(tmp_path)) == {"student": 1}
    _close(worker.adapter_state("student"), saved)
    _close(worker.optimizer_state("student"), saved_opt)
    worker.train_step("student", nxt)
    _close(worker.adapter_state("student"), once)  # the resumed step is the same step, bit for bit


def test_hf_export_is_the_merged_model(worker, stepped, tiny_model, tmp_path):
    worker.export_hf("student", str(tmp_path))
    assert not (tmp_path / "adapter_config.json").exists()  # a plain model folder, not an adapter
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    module = worker.policies["student"].engine.module
    ids = torch.tensor([[5, 17, 300, 42, 1999, 7, 64]])
    module.eval()
    try:
        with torch.no_grad():
            want = module(input_ids=ids).logits
            got = exported(input_ids=ids).logits
            untrained = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
    finally:
        module.train()
    assert (want - untrained).abs().max() > 1e-4  # the adapter moved the logits: the comparison is not trivial
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# what DeepSpeed offloads of an idle LoRA role: ZeRO-2 all of the adapter's states; ZeRO-3 (with torch's AdamW)
# its gradients, and never the frozen base (see offload.include)
OFFLOADED = {2: ["hp_params", "lp_grads", "lp_params", "optim_states"], 3: ["contiguous_grad_buffer", "lp_grads"]}


@pytest.mark.parametrize("stage", [2, 3])
def test_two_roles_offload_and_merge(process, tiny_model, base, stage, monkeypatch):
    """Both roles on one rank, the idle one offloaded; ZeRO-3 keeps only partitions in the module, so the merge
    gathers W, A and B of each layer (on CPU DeepSpeed's offload bookkeeping runs, with no copies). ZeRO-3 is
    kept on this one rank, as a cluster's ranks run it (the learner itself would run stage 2 here)."""
    monkeypatch.setattr(role_engine, "zero_stage", lambda lc, world_size: lc.zero_stage)
    w = _worker(tiny_model, ("examiner", "student"), **{"learner.zero_stage": stage, "learner.offload_inactive": True})
    try:
        pol = w.policies["student"]
        assert pol.zero3 == (stage == 3) == all(p.numel() == 0 for p in pol.engine.module.parameters())
        assert [n for n, _, _ in pol.param_metadata()] == list(base)
        w.train_step("student", experience_batch("student", seed=3, n=4))
        assert w.offloaded_states("examiner") == OFFLOADED[stage]
        _close(w.state_dict("examiner"), base)  # idle, untrained: B = 0, so the merge is the base bit for bit
        adapter = {k.replace(".default.", "."): v for k, v in w.adapter_state("student").items()}
        assert all(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)  # the merge is not W
        _close(w.state_dict("student"), _merged_here(base, adapter), exact=False)
        w.transports[("student", "recording")] = _Recording(bucket_mb=1)
        _close(dict(w.publish("student", "recording", form="adapter").tensors), adapter)  # gathered under ZeRO-3
        w.train_step("examiner", experience_batch("examiner", seed=5, n=4))  # the examiner comes back and trains
        assert w.offloaded_states("student") == OFFLOADED[stage]
        assert not torch.equal(w.state_dict("examiner")["model.layers.0.mlp.up_proj.weight"],
                               base["model.layers.0.mlp.up_proj.weight"])
    finally:
        w.close()
