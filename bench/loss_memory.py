"""Benchmark the peak memory of one learner loss forward+backward, chunked vs unchunked, on Qwen3's vocabulary.

The loss takes final hidden states and the LM head (as the learner does) on a 151,936-token vocabulary,
with every term on: truncated-IS surrogate, k3 reference KL, top-20 distillation with a tail bucket, and
the entropy metric. `chunked` uses `learner.loss.chunk_tokens` rows at a time (recomputed in the backward);
`unchunked` makes the whole micro-batch's logits at once, as the learner did before. The cluster
micro-batch (qwen3-4b: 16,384 tokens, hidden 2,560, chunk 1,024) is scaled down by `--scale` in tokens,
chunk and hidden size alike (same number of chunks, same share of the head's weight), to fit a small machine.

Each mode runs in a fresh process. The peak is counted above a baseline that already holds the hidden
states, the head weight and its gradient buffer (the model's own memory, as in a training step): on CUDA
`max_memory_allocated`, on CPU the process's peak resident set (VmHWM, reset after setup).

    python bench/loss_memory.py [--scale 8] [--hidden 1024] [--device cpu|cuda]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

VOCAB, K = 151_936, 20
CLUSTER_TOKENS, CLUSTER_HIDDEN, CLUSTER_CHUNK = 16_384, 2_560, 1_024
SEQ = 1_024  # tokens per sequence in the micro-batch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _shape(tokens: int) -> tuple[int, int]:
    B = max(1, tokens // SEQ)
    return B, tokens // B + 1


def _batch(tokens: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, T = _shape(tokens)
    mask = torch.ones(B, T - 1)
    mask[:, : T // 8] = 0  # the prompt
    lp = torch.log_softmax(torch.randn(B, T - 1, K + 1, generator=g), -1)
    batch = {"input_ids": torch.randint(0, VOCAB, (B, T), generator=g), "mask": mask,
             "old_logprobs": -torch.rand(B, T - 1, generator=g) * 5 * mask,
             "advantages": torch.randn(B, 1, generator=g).expand(B, T - 1).contiguous(),
             "ref_logprobs": -torch.rand(B, T - 1, generator=g) * 5 * mask,
             "teacher_ids": torch.randint(0, VOCAB, (B, T - 1, K), generator=g),
             "teacher_logprobs": lp[..., :K], "teacher_tail": lp[..., K], "teacher_mask": mask.clone()}
    return {k: v.to(device) for k, v in batch.items()}


def run_one(mode: str, tokens: int, hidden: int, chunk: int, device: str) -> dict:
    from piplay_ray.config import LossConfig
    from piplay_ray.learner import losses

    torch.manual_seed(0)
    cfg = LossConfig(kl_beta=0.01, chunk_tokens=chunk if mode == "chunked" else 0)
    batch = _batch(tokens, device)
    h = (torch.randn(*_shape(tokens), hidden, device=device) / math.sqrt(hidden)).requires_grad_(True)
    w = torch.randn(VOCAB, hidden, device=device).requires_grad_(True)
    head = (lambda x: x @ w.T) if mode == "chunked" else None
    cuda = device.startswith("cuda")
    for _ in range(2):  # the first pass warms up library workspaces and thread arenas; the second is measured
        w.grad = torch.zeros_like(w)  # the gradient buffers a training step already holds
        h.grad = torch.zeros_like(h)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            base = _rss_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        loss, _ = losses.compute_loss(h if head else h @ w.T, batch, cfg, lam=0.03, head=head)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss_kib("VmHWM") * 1024 - base
        seconds = time.perf_counter() - t0
        loss = loss.detach()
    return {"peak_bytes": peak, "seconds": seconds, "loss": float(loss.detach()),
            "grad_norm_w": float(w.grad.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=8, help="divide the cluster micro-batch tokens and chunk by this")
    ap.add_argument("--hidden", type=int, default=0, help="default: the model's hidden size / scale")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", choices=["chunked", "unchunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    tokens, chunk = CLUSTER_TOKENS // args.scale, max(1, CLUSTER_CHUNK // args.scale)
    args.hidden = args.hidden or CLUSTER_HIDDEN // args.scale
    if args.one:
        print(json.dumps(run_one(args.one, tokens, args.hidden, chunk, args.device)))
        return
    res = {}
    for mode in ("chunked", "unchunked"):
        cmd = [sys.executable, __file__, "--one", mode, "--scale", str(args.scale), "--hidden", str(args.hidden),
               "--device", args.device]
        # big blocks straight from mmap, so freed memory leaves the resident set (glibc would keep it)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
        res[mode] = json.loads(out)
    c, u = res["chunked"], res["unchunked"]
    same = math.isclose(c["loss"], u["loss"], rel_tol=1e-4) and math.isclose(c["grad_norm_w"], u["grad_norm_w"],
                                                                             rel_tol=1e-3)
    print(json.dumps({
        "bench": "loss_memory", "device": args.device, "vocab": VOCAB, "tokens": tokens, "hidden": args.hidden,
        "chunk_tokens": chunk, "dtype": "float32",
        "scale": f"1/{args.scale} of the qwen3-4b micro-batch ({CLUSTER_TOKENS} tokens, chunk {CLUSTER_CHUNK}); "
                 f"hidden {args.hidden} (model: {CLUSTER_HIDDEN})",
        "chunked_peak_gb": round(c["peak_bytes"] / 1e9, 3), "unchunked_peak_gb": round(u["peak_bytes"] / 1e9, 3),
        "ratio": round(c["peak_bytes"] / u["peak_bytes"], 3),
        "chunked_s": round(c["seconds"], 2), "unchunked_s": round(u["seconds"], 2), "same_loss_and_grad": same}))


if __name__ == "__main__":
    main()
