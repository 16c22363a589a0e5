"""Engines: vLLM agrees with transformers (the reference), and a weight push changes vLLM's outputs exactly.

One vLLM engine (tiny model, float32) is shared by the module; a few tests compare it with the transformers
engine holding the same weights, recomputing logprobs by teacher forcing.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from piplay_ray.engines import SamplingSpec, named_tensors
from piplay_ray.engines.transformers_engine import TransformersEngine, sample_token
from piplay_ray.method import protocol as P

TOL = 2e-3  # float32 CPU kernels differ in summation order; logprobs agree to ~1e-5 in practice


@pytest.fixture(scope="module")
def tied_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with tied input/output embeddings: the case where an in-place reload on the vLLM CPU
    backend left the LM head's prepacked GEMM stale (DESIGN.md section 4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.model.embed_tokens.weight = model.lm_head.weight
    out = tmp_path_factory.mktemp("tied")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def hf(tied_model):
    engine = TransformersEngine(tied_model, dtype="float32", num_threads=1)
    assert engine.model.config.tie_word_embeddings
    assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()
    return engine


@pytest.fixture(scope="module")
def vllm_engine(tied_model):
    from piplay_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(tied_model, dtype="float32", max_model_len=1024, max_num_seqs=16, kv_cache_gib=1)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prompts(hf):
    questions = ["Who wrote Hamlet?", "What is the capital of the country where the Nile ends?",
                 "Which river flows through Vienna?"]
    return [P.student_prompt_ids(hf.tokenizer, q) for q in questions]


def teacher_forced(engine: TransformersEngine, prompt: list[int], response: list[int]) -> list[float]:
    dist = engine.logprobs_of(prompt + response, len(prompt))
    return dist[torch.arange(len(response)), torch.tensor(response)].tolist()


def test_named_tensors_accepts_pairs_dicts_and_bundles():
    t = torch.zeros(2)

    class Bundle:
        def named_tensors(self):
            return iter([("a", t)])

    assert [n for n, _ in named_tensors([("a", t)])] == ["a"]
    assert [n for n, _ in named_tensors({"a": t})] == ["a"]
    assert [n for n, _ in named_tensors(Bundle())] == ["a"]
    with pytest.raises(TypeError):
        list(named_tensors([("a", [1.0])]))
    with pytest.raises(TypeError):
        list(named_tensors(3))


def test_sample_token_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {sample_token(logits, 1.0, 0.7, g) for _ in range(300)}
    assert seen == {0, 1}  # nucleus 0.7 keeps exactly the two most likely tokens
    assert sample_token(logits, 0.0, 1.0, None) == 0


def test_transformers_generate_stop_and_logprobs(hf, prompts):
    spec = SamplingSpec(max_tokens=24, temperature=1.0, seed=3)
    gen = asyncio.run(hf.generate(prompts[0], spec))
    assert gen.finish_reason in ("length", "eos") and len(gen.token_ids) == len(gen.logprobs) > 0
    assert gen.logprobs == pytest.approx(teacher_forced(hf, prompts[0], gen.token_ids), abs=1e-4)
    # a stop string that the sampled text contains ends generation right after it
    text = hf.tokenizer.decode(gen.token_ids)
    stop = text.strip().split()[1] if len(text.split()) > 2 else text[:2]
    stopped = asyncio.run(hf.generate(prompts[0], SamplingSpec(max_tokens=24, temperature=1.0, seed=3,
                                                               stop=(stop,))))
    assert stopped.finish_reason == "stop" and stop in hf.tokenizer.decode(stopped.token_ids)
    assert stopped.token_ids == gen.token_ids[: len(stopped.token_ids)]
    assert stop not in hf.tokenizer.decode(stopped.token_ids[:-1])


def test_vllm_greedy_matches_transformers(vllm_engine, hf, prompts):
    spec = SamplingSpec(max_tokens=20, temperature=0.0)

    async def both():
        return await asyncio.gather(*[vllm_engine.generate(p, spec) for p in prompts])

    for prompt, gen in zip(prompts, asyncio.run(both()), strict=True):
        ref = asyncio.run(hf.generate(prompt, spec))
        assert gen.token_ids == ref.token_ids
        assert gen.logprobs == pytest.approx(ref.logprobs, abs=TOL)
        assert gen.finish_reason == ref.finish_reason


def test_vllm_sampling_logprobs_match_teacher_forcing(vllm_engine, hf, prompts):
    spec = SamplingSpec(max_tokens=24, temperature=1.0, stop=P.STOP_STRINGS)

    async def many():
        return await asyncio.gather(*[vllm_engine.generate(p, spec) for p in prompts for _ in range(3)])

    gens = asyncio.run(many())
    assert len({tuple(g.token_ids) for g in gens}) > 3  # sampling, not greedy
    for i, gen in enumerate(gens):
        prompt = prompts[i // 3]
        assert gen.logprobs == pytest.approx(teacher_forced(hf, prompt, gen.token_ids), abs=TOL)


def test_vllm_stop_string(vllm_engine, hf, prompts):
    free = asyncio.run(vllm_engine.generate(prompts[1], SamplingSpec(max_tokens=24, temperature=1.0, seed=11)))
    text = hf.tokenizer.decode(free.token_ids)
    stop = text.split()[2]
    gen = asyncio.run(vllm_engine.generate(prompts[1], SamplingSpec(max_tokens=24, temperature=1.0, seed=11,
                                                                    stop=(stop,))))
    assert gen.finish_reason == "stop"
    assert gen.token_ids == free.token_ids[: len(gen.token_ids)]
    assert stop in hf.tokenizer.decode(gen.token_ids) and stop not in hf.tokenizer.decode(gen.token_ids[:-1])


def test_vllm_prompt_topk_matches_transformers(vllm_engine, hf, prompts):
    seq = prompts[2] + prompts[0][5:20]
    start, k = len(prompts[2]) - 3, 5
    got = asyncio.run(vllm_engine.prompt_topk(seq, start, k))
    ref = hf.prompt_topk_sync(seq, start, k)
    assert len(got.ids) == len(seq) - start and all(len(r) == k for r in got.ids)
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=TOL, rtol=0)
    for a, b, lp in zip(got.ids, ref.ids, ref.logprobs, strict=True):
        if min(abs(x - y) for x, y in zip(lp, lp[1:], strict=False)) > 1e-3:  # ids agree where there are no near ties
            assert a == b
    with pytest.raises(ValueError):
        asyncio.run(vllm_engine.prompt_topk(seq, 0, k))


def test_vllm_weight_update_matches_transformers(vllm_engine, hf, tied_model, prompts):
    """Perturb every weight (the tied embedding / LM head included), push, and compare with transformers:
    greedy tokens and their logprobs, and top-k distributions over a whole sequence."""
    spec = SamplingSpec(max_tokens=16, temperature=0.0)
    prompt, seq = prompts[0], prompts[1]
    start, k = 10, 4

    def close(a, b):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=TOL, rtol=0)

    old = asyncio.run(vllm_engine.generate(prompt, spec))  # also leaves this prompt in the prefix cache
    ref_old = asyncio.run(hf.generate(prompt, spec))
    assert old.token_ids == ref_old.token_ids and old.logprobs == pytest.approx(ref_old.logprobs, abs=TOL)
    close(asyncio.run(vllm_engine.prompt_topk(seq, start, k)).logprobs, hf.prompt_topk_sync(seq, start, k).logprobs)

    g = torch.Generator().manual_seed(1)
    new = {n: p.detach() + 0.2 * p.detach().std() * torch.randn(p.shape, generator=g)
           for n, p in hf.model.named_parameters()}
    changed = TransformersEngine(tied_model, dtype="float32", num_threads=1)
    changed.update_weights(7, new.items())
    ref_new = asyncio.run(changed.generate(prompt, spec))
    ref_topk = changed.prompt_topk_sync(seq, start, k).logprobs
    shift = (torch.tensor(ref_topk) - torch.tensor(hf.prompt_topk_sync(seq, start, k).logprobs)).abs().max()
    assert shift > 0.1  # the perturbation matters

    vllm_engine.update_weights(7, new.items())
    assert vllm_engine.version == 7
    got = asyncio.run(vllm_engine.generate(prompt, spec))
    assert got.token_ids == ref_new.token_ids
    assert got.versions == [7] * len(got.token_ids)  # every token says which weights made it
    assert got.logprobs == pytest.approx(ref_new.logprobs, abs=TOL)
    close(asyncio.run(vllm_engine.prompt_topk(seq, start, k)).logprobs, ref_topk)

    # and back: pushing the original weights restores the original outputs (async path)
    asyncio.run(vllm_engine.aupdate_weights(8, hf.model.named_parameters()))
    back = asyncio.run(vllm_engine.generate(prompt, spec))
    assert back.versions == [8] * len(back.token_ids)
    assert back.token_ids == ref_old.token_ids and back.logprobs == pytest.approx(ref_old.logprobs, abs=TOL)
    close(asyncio.run(vllm_engine.prompt_topk(seq, start, k)).logprobs, hf.prompt_topk_sync(seq, start, k).logprobs)


def test_transformers_update_weights_rejects_bad_input(tiny_model):
    engine = TransformersEngine(tiny_model, dtype="float32", num_threads=1)
    with pytest.raises(KeyError):
        engine.update_weights(1, [("no.such.weight", torch.zeros(1))])
    name, p = next(iter(engine.model.named_parameters()))
    with pytest.raises(ValueError):
        engine.update_weights(1, [(name, torch.zeros(p.shape[0] + 1))])


def test_shared_weight_files_of_dead_writers_are_swept(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from piplay_ray.engines.vllm_weights import sweep_orphans, write_shared

    mine = write_shared([("w", torch.arange(4.0))], folder=str(tmp_path))
    assert torch.equal(load_file(mine)["w"], torch.arange(4.0))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"piplay-weights-{int(dead.stdout)}-x1.safetensors"  # a writer killed mid-sync
    orphan.write_bytes(b"0" * 16)
    other = tmp_path / "piplay-weights-notapid.safetensors"  # not ours to judge
    other.write_bytes(b"0")
    assert sweep_orphans(str(tmp_path)) == [str(orphan)]
    assert {p.name for p in tmp_path.iterdir()} == {Path(mine).name, other.name}
