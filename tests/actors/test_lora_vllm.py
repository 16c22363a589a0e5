"""vLLM serving LoRA (CPU build): each adapter version, by object-store bundle or collective broadcast, is
loaded in place, and the engine's prompt logprobs then equal transformers + PEFT holding the same adapter.

One vLLM engine (tiny model, float32, rank-4 adapters on every linear layer) is shared by the module. The
adapters are random (B nonzero), set on a PEFT model here, which is also the reference.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from piplay_ray.config import LoraConfig
from piplay_ray.learner import lora
from piplay_ray.weight_sync import make_transport

LC = LoraConfig(rank=4, alpha=8.0)
SEQ = list(range(5, 70, 3))
K = 5


@pytest.fixture(scope="module")
def engine(tiny_model):
    from piplay_ray.engines.vllm_engine import VLLMEngine

    e = VLLMEngine(tiny_model, dtype="float32", max_model_len=512, max_num_seqs=4, kv_cache_gib=1, lora=LC)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def peft_model(tiny_model):
    return lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), LC).eval()


def _set_adapter(model, seed: int) -> dict[str, torch.Tensor]:
    """Random A and B on the PEFT model; returns them under PEFT's saved names (what the learner sends)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, p in lora.adapter_parameters(model).items():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
            out[lora.peft_name(name)] = p.detach().clone()
    return out


def _reference(model) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([SEQ])).logits[0, :-1].float(), -1)
    values, ids = torch.topk(lp, K, dim=-1)
    return ids, values


def _check(engine, model) -> None:
    top = asyncio.run(engine.prompt_topk(SEQ, 1, K))
    ids, values = _reference(model)
    assert top.ids == ids.tolist()
    torch.testing.assert_close(torch.tensor(top.logprobs), values, atol=1e-4, rtol=0)


def test_vllm_loads_each_adapter_version_in_place(engine, peft_model):
    from piplay_ray.engines.vllm_lora import shm_dir

    assert engine.weight_form == "adapter" and engine.lora_note is None
    with peft_model.disable_adapter():  # version 0: the zero adapter serves the base model
        _check(engine, peft_model)

    first = _set_adapter(peft_model, 1)
    engine.update_weights(1, first.items())  # the object-store path: tensors in this process
    assert engine.version == 1
    _check(engine, peft_model)

    # the collective path: learner rank 0 (here a thread) broadcasts; vLLM's worker writes the folder
    second = _set_adapter(peft_model, 2)
    tx = make_transport("collective", bucket_mb=1)
    rdv = tx.open("127.0.0.1", world=2, generation=1, timeout_s=120)
    sender = threading.Thread(target=tx.publish, args=(2, iter(second.items())))
    sender.start()
    try:
        assert asyncio.run(engine.areceive_weights(rdv.ticket(1, 2))) == 2
    finally:
        sender.join(timeout=120)
    _check(engine, peft_model)
    assert engine._lora_ids == 3 and not os.path.exists(engine._lora_request.lora_path)  # loaded, then deleted

    folders = set(os.listdir(shm_dir()))
    with pytest.raises(KeyError, match="not a LoRA matrix"):
        engine.update_weights(3, {"model.norm.weight": torch.ones(128)})
    _check(engine, peft_model)  # a refused sync leaves the adapter as it was
    assert set(os.listdir(shm_dir())) <= folders  # and no folder behind


def test_vllm_serves_the_teacher_adapter_beside_the_policys(engine, peft_model):
    """teacher.backend=shared: a second adapter, used by `teacher_topk` only; each version swapped in place."""
    policy = _set_adapter(peft_model, 4)
    engine.update_weights(4, policy.items())
    for version, seed in ((1, 5), (2, 6)):
        teacher = _set_adapter(peft_model, seed)  # the reference now holds the teacher's adapter
        asyncio.run(engine.aload_teacher(version, teacher.items()))
        teacher_ref = ids, values = _reference(peft_model)
        top = asyncio.run(engine.teacher_topk(SEQ, 1, K))
        assert engine.teacher_version == version and top.ids == ids.tolist()
        torch.testing.assert_close(torch.tensor(top.logprobs), values, atol=1e-4, rtol=0)
    _set_adapter(peft_model, 4)
    _check(engine, peft_model)  # the policy's own requests still use the policy's adapter

    async def together():  # teacher and policy prompt logprobs in one batch (the LM head takes no LoRA)
        return await asyncio.gather(engine.teacher_topk(SEQ, 1, K), engine.prompt_topk(SEQ, 1, K),
                                    engine.teacher_topk(SEQ, 1, K))

    first, own, again = asyncio.run(together())
    for top, (ids, values) in ((first, teacher_ref), (own, _reference(peft_model)), (again, teacher_ref)):
        assert top.ids == ids.tolist()
        torch.testing.assert_close(torch.tensor(top.logprobs), values, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_vllm_without_lora_support_takes_full_weights(tiny_model):
    """A rank vLLM cannot serve: the engine says why and starts without LoRA, taking full weights as before."""
    from piplay_ray.engines.vllm_engine import VLLMEngine

    e = VLLMEngine(tiny_model, dtype="float32", max_model_len=512, max_num_seqs=4, kv_cache_gib=1,
                   lora=LoraConfig(rank=600, alpha=8.0))
    try:
        assert e.weight_form == "full" and "max_lora_rank" in e.lora_note
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)
        e.update_weights(1, model.state_dict().items())
        _check(e, model)
    finally:
        e.shutdown()
