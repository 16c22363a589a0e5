"""Embedded assets: the corpus, the tiny model, SmolLM2 (slow).

That vLLM and transformers agree on the tiny model is test_weight_sync_group's check (sampled logprobs, after
each sync) and test_engines' (greedy tokens and logprobs, tied embeddings)."""

from __future__ import annotations

import json
import shutil

import pytest

from piplay_ray import assets


def test_corpus_is_wiki_jsonl_with_over_10k_docs(corpus_path):
    docs = [json.loads(line) for line in open(corpus_path, encoding="utf-8")]
    assert len(docs) >= 10_000
    assert len({d["id"] for d in docs}) == len(docs)
    d = docs[0]
    assert d["contents"].startswith(f'"{d["title"]}"\n') and len(d["contents"]) > len(d["title"]) + 20


def test_asset_manifest_detects_corruption(tmp_path, tiny_model):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_model, copy)
    assert assets.verify(copy)
    with open(copy / "config.json", "a") as f:
        f.write(" ")
    assert not assets.verify(copy)


def test_builtin_names_resolve_and_unknown_ones_are_refused(tiny_model):
    assert assets.resolve_model("builtin:tiny") == tiny_model
    assert assets.resolve_model("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    with pytest.raises(ValueError, match="builtin:smollm2"):
        assets.resolve_model("builtin:nope")


def test_tiny_model_loads_with_chat_template(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    cfg = AutoConfig.from_pretrained(tiny_model)
    assert cfg.hidden_size // cfg.num_attention_heads >= 64  # vLLM CPU refuses head_dim 16
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.eos_token_id == tok.eos_token_id


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "quantization_config" not in json.loads(open(f"{smollm2}/config.json").read())  # vLLM refuses gguf
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text
