"""SmolLM2 (tied embeddings, the case DESIGN.md section 4 found broken): vLLM after a weight push equals
transformers holding the same weights."""

from __future__ import annotations

import asyncio

import pytest
import torch

from piplay_ray.engines import SamplingSpec
from piplay_ray.engines.transformers_engine import TransformersEngine
from piplay_ray.method import protocol as P

pytestmark = pytest.mark.slow
TOL = 5e-3


def test_smollm2_weight_push_tied_embeddings(smollm2):
    from piplay_ray.engines.vllm_engine import VLLMEngine

    hf = TransformersEngine(smollm2, dtype="float32")
    assert hf.model.config.tie_word_embeddings
    prompt = P.student_prompt_ids(hf.tokenizer, "What is the capital of France?")
    spec = SamplingSpec(max_tokens=12, temperature=0.0)
    engine = VLLMEngine(smollm2, dtype="float32", max_model_len=1024, max_num_seqs=4)
    try:
        before = asyncio.run(engine.generate(prompt, spec))
        ref = asyncio.run(hf.generate(prompt, spec))
        assert before.token_ids == ref.token_ids and before.logprobs == pytest.approx(ref.logprobs, abs=TOL)

        g = torch.Generator().manual_seed(0)
        new = {n: p.detach() + 0.02 * p.detach().std() * torch.randn(p.shape, generator=g)
               for n, p in hf.model.named_parameters()}
        hf.update_weights(1, new.items())
        ref_new = asyncio.run(hf.generate(prompt, spec))
        engine.update_weights(1, new.items())
        after = asyncio.run(engine.generate(prompt, spec))
        assert after.token_ids == ref_new.token_ids
        assert after.logprobs == pytest.approx(ref_new.logprobs, abs=TOL)
    finally:
        engine.shutdown()
