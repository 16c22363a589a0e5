"""The shapes of the models the cluster configs train, for sizing a layout where the model's files are not at
hand (a laptop, CI): an embedded table from each model's public config.json, or a local folder's config.json.
Pure arithmetic: `params`, a LoRA adapter's size, the values a block keeps for its backward, KV bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """The figures of a decoder (Qwen3: no biases, q/k RMSNorm per head) that size its memory."""

    hidden: int
    layers: int
    inter: int  # MLP width
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # output head shares the embedding

    def linears(self) -> dict[str, tuple[int, int]]:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.inter
        return dict(zip(LINEARS, [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)], strict=True))

    @property
    def params(self) -> float:
        block = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden + 2 * self.head_dim
        return float(self.layers * block + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden)

    def adapted(self, targets: list[str]) -> list[tuple[int, int]]:
        """(in, out) of each linear LoRA adapts in a block (`all-linear`: every one; never the output head)."""
        return [d for n, d in self.linears().items() if "all-linear" in targets or any(n.endswith(t) for t in targets)]

    def lora_params(self, rank: int, targets: list[str]) -> float:  # A: r x in, B: out x r
        return float(self.layers * rank * sum(i + o for i, o in self.adapted(targets)))

    def block_values(self, lora_targets: list[str] | None = None) -> int:
        """Values per token one block keeps for its backward: 6 on the residual stream, q/k/v with their norms
        and rotary outputs and the attention output, 4 of the MLP width, and each LoRA branch's output."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 6 * h + 4 * q + 4 * kv + 4 * self.inter + sum(o for _, o in self.adapted(lora_targets or []))

    kv_bytes_per_token = property(lambda self: 2 * self.layers * self.kv_heads * self.head_dim * 2)  # K+V, bf16


# from each model's public config.json on the Hugging Face hub (no network here)
ARCHS = {
    "Qwen/Qwen3-0.6B": Arch(1024, 28, 3072, 16, 8, 128, 151936, True),
    "Qwen/Qwen3-1.7B": Arch(2048, 28, 6144, 16, 8, 128, 151936, True),
    "Qwen/Qwen3-4B": Arch(2560, 36, 9728, 32, 8, 128, 151936, True),
    "Qwen/Qwen3-4B-Instruct-2507": Arch(2560, 36, 9728, 32, 8, 128, 151936, True),  # Qwen3-4B's shapes
    "Qwen/Qwen3-8B": Arch(4096, 36, 12288, 32, 8, 128, 151936, False),
}


def arch(name: str) -> Arch:
    """The table's entry for `name`, else the config.json of a local model folder; else a clear error."""
    if name in ARCHS:
        return ARCHS[name]
    if (path := Path(name) / "config.json").is_file():
        c = json.loads(path.read_text())
        h, heads = c["hidden_size"], c["num_attention_heads"]
        return Arch(h, c["num_hidden_layers"], c["intermediate_size"], heads, c.get("num_key_value_heads", heads),
                    c.get("head_dim") or h // heads, c["vocab_size"], c.get("tie_word_embeddings", False))
    raise ValueError(f"unknown model {name!r}; known: {', '.join(ARCHS)} "
                     "(or a local folder with a config.json)")
