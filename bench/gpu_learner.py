"""The learner's half of the GPU path on one CUDA device, without Ray or vLLM.

`make gpu-check` runs the whole loop and needs Ray and vLLM built for CUDA. A GPU machine that cannot
install them (no registry, and Ray's wheel alone is 79 MB) still runs this: the code a learner rank runs on
a cluster, driven directly instead of through a Ray actor:
- the rank environment as Ray's device isolation leaves it (one visible GPU -> local rank 0), DeepSpeed over
  NCCL, ZeRO-3 in bf16 (run as stage 2 on this one rank: `role_engine.zero_stage`), fused AdamW,
  `offload_inactive` (GPU bytes of each role before and after);
- an RL step of each role (truncated IS, k3 KL to a reference, top-K distillation with tail) and an SFT step,
  with tokens/s, model FLOPs utilisation and peak GPU memory, on sequences of varied lengths, right-padded
  or with `--pack` packed (`learner.pack_sequences`): run both to compare;
- the ZeRO-3 export: gathered parameters equal the Hugging Face folder written;
- the weight sync to the transformers engine in a second process on the same GPU: `collective` over gloo
  (through host memory: NCCL refuses two ranks on one device, which is tried too and reported) and `ipc`
  (CUDA IPC handles: the receiver copies device to device).
The model is random weights in a real architecture (`--arch`), so nothing is downloaded. Prints one JSON
line (and, on a GPU, a second for the NCCL attempt); exits 1 if a check fails.

    python bench/gpu_learner.py [--arch qwen3-0.6b|smollm2-135m] [--tokenizer DIR] [--tokens 16384] [--pack]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCHS = {  # published shapes of the models the configs train
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151_936,
                       tie_word_embeddings=True, max_position_embeddings=4096),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49_152,
                         tie_word_embeddings=True, max_position_embeddings=2048),
}


# dense bf16 peak TFLOP/s by device name (without sparsity); a card not listed reports MFU null
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0),
               ("A100", 312.0), ("L40S", 362.0))


def peak_tflops(device: str) -> float | None:
    return next((peak for name, peak in PEAK_TFLOPS if name in device), None)


def mfu(trainable: int, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: 6 x trainable parameters per token (forward 2, backward 4; attention's
    sequence-length term and the KL reference's forward not counted) over the card's peak."""
    return round(6 * trainable * tokens_per_s / (peak * 1e12), 4) if peak else None


def checksum(named) -> float:
    return sum(float(t.detach().double().sum()) for _, t in named)


def build_model(arch: str, tokenizer: str, out: Path, dtype: torch.dtype) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dims = dict(ARCHS[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(dims.pop("model_type"), **dims), dtype=dtype)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)


def experiences(role: str, n: int, length: int, vocab: int, k: int, seed: int):
    from piplay_ray.records import Experience

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # lengths from length/2 to 3 length/2 (mean ~length): what padding wastes and packing saves
        total = length // 2 + (i * 397) % length
        p, r = total // 4, total - total // 4
        mask = [1] * r
        mask[r // 3 : r // 3 + 16] = [0] * 16  # an inserted <information> block
        lp = torch.log_softmax(torch.randn(r, k + 1, generator=g), -1)
        distill = role == "student"
        out.append(Experience(
            group_id=f"g{i // 4}", role=role, prompt_ids=torch.randint(0, vocab, (p,), generator=g).tolist(),
            response_ids=torch.randint(0, vocab, (r,), generator=g).tolist(), mask=mask,
            logprobs=(-torch.rand(r, generator=g) * 4).tolist(), reward=float(i % 2), advantage=(i % 2) - 0.5,
            version=0,
            teacher_ids=torch.randint(0, vocab, (r, k), generator=g).tolist() if distill else None,
            teacher_logprobs=lp[:, :k].tolist() if distill else None,
            teacher_tail=lp[:, k].tolist() if distill else None))
    return out


def receive(ticket: str, model_dir: str, dtype: str) -> None:
    """The receiving process: the transformers engine on this GPU joins the group and loads in place."""
    from piplay_ray.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(model_dir, dtype=dtype)
    print("ready", flush=True)  # the sender's clock starts now, not while this process loads
    t0 = time.perf_counter()
    version = engine.receive_weights(json.loads(ticket))
    seconds = time.perf_counter() - t0
    print(json.dumps({"version": version, "seconds": seconds,
                      "checksum": checksum(engine.model.named_parameters())}), flush=True)


def sync(worker, role: str, kind: str, backend: str, generation: int, model_dir: str, dtype: str,
         timeout: float) -> dict:
    """Send `role`'s weights from the learner to a receiver process over a pushing transport (`kind`:
    collective with `backend`, or ipc); returns what both sides saw."""
    transport = worker._transport(role, kind)
    rdv = transport.open("127.0.0.1", 2, generation, timeout, backend)
    ticket = json.dumps(rdv.ticket(1, worker.version(role)))
    proc = subprocess.Popen([sys.executable, __file__, "--receive", ticket, "--model-dir", model_dir,
                             "--dtype", dtype], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the receiver did not start: {proc.communicate(timeout=timeout)[1][-300:]}")
        receipt = worker.publish(role, kind)
        out, err = proc.communicate(timeout=timeout)
    except Exception as e:  # noqa: BLE001 - reported in the JSON line, the check fails
        proc.kill()
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    if proc.returncode != 0:
        return {"ok": False, "error": err.strip().splitlines()[-1][:300] if err.strip() else "receiver failed"}
    got = json.loads(out.strip().splitlines()[-1])
    sent = checksum(worker.state_dict(role).items())
    return {"ok": math.isclose(got["checksum"], sent, rel_tol=1e-9) and got["version"] == receipt.version,
            "gb": round(receipt.nbytes / 1e9, 3), "publish_s": round(receipt.publish_s, 3),
            "gb_per_s": round(receipt.nbytes / 1e9 / receipt.publish_s, 2), "receiver_s": round(got["seconds"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="qwen3-0.6b")
    ap.add_argument("--tokenizer", default=str(Path.home() / ".cache/piplay/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--tokens", type=int, default=16_384, help="tokens per training step")
    ap.add_argument("--pack", action="store_true", help="learner.pack_sequences=true: micro-batches packed")
    ap.add_argument("--receive", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receive:
        receive(args.receive, args.model_dir, args.dtype)
        return 0
    with tempfile.TemporaryDirectory(prefix="piplay-gpu-learner-") as work:  # two model copies: removed after
        return run(args, Path(work) / "model")


def run(args: argparse.Namespace, model_dir: Path) -> int:
    from piplay_ray.config import load_config
    from piplay_ray.learner.rank import LearnerWorkerImpl, _free_port, rank_args
    from piplay_ray.roles import TRAINED as ROLES

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    build_model(args.arch, args.tokenizer, model_dir, dtype)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.base={model_dir}", "learner.zero_stage=3", "learner.offload_inactive=true",
        "learner.micro_batch_tokens=8192", "learner.loss.kl_beta=0.01", "learner.loss.chunk_tokens=1024",
        f"learner.pack_sequences={str(args.pack).lower()}"])
    worker = LearnerWorkerImpl(rank=0, world_size=1, **rank_args(cfg, ROLES))
    # what Ray hands a rank under device isolation: its one GPU, visible as index 0
    info = worker.setup("127.0.0.1", _free_port(), 0, 1, ["0"] if cuda else [])
    report = {"bench": "gpu_learner", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "arch": args.arch, "pack": args.pack, "setup": info, "setup_s": round(time.perf_counter() - t0, 1)}
    peak = peak_tflops(report["device"])
    # all trainable parameters (a tied embedding once: it is also the LM head's matmul); full under ZeRO-3 too
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in worker.policies[ROLES[0]].engine.module.parameters()
                    if p.requires_grad)
    report.update(trainable_params=trainable, peak_tflops=peak)
    mem = lambda: round(torch.cuda.memory_allocated() / 1e9, 3) if cuda else None  # noqa: E731
    vocab, length = ARCHS[args.arch]["vocab_size"], 1024
    n = max(2, args.tokens // length)
    steps, resident = {}, {"after_setup": mem()}
    for role, objective in (("examiner", "rl"), ("student", "rl"), ("student", "sft"), ("examiner", "rl")):
        before = checksum(worker.state_dict(role).items())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        m = worker.train_step(role, experiences(role, n, length, vocab, 8, len(steps)), lam=0.03, objective=objective)
        key = f"{role}_{objective}" + ("_again" if f"{role}_{objective}" in steps else "")
        steps[key] = {"loss": round(m["loss"], 4), "tokens_per_s": round(m["tokens_per_s"]),
                      "mfu": mfu(trainable, m["tokens_per_s"], peak), "micro_batches": int(m["micro_batches"]),
                      "step_s": round(m["step_time_s"], 3), "grad_norm": round(m["grad_norm"], 4),
                      "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
                      "changed": checksum(worker.state_dict(role).items()) != before,
                      "idle_role_offloaded": worker.policies[ROLES[1 - ROLES.index(role)]].offloaded}
        resident[f"after_{key}"] = mem()
    report["steps"], report["resident_gb"] = steps, resident
    export = model_dir.parent / "export"
    worker.export_hf("student", str(export))
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(export, dtype=dtype)
    report["export_equal"] = math.isclose(checksum(exported.named_parameters()),
                                          checksum(worker.state_dict("student").items()), rel_tol=1e-9)
    engine_dtype = "bfloat16" if cuda else "float32"
    report["sync_gloo"] = sync(worker, "student", "collective", "gloo", 1, str(model_dir), engine_dtype, 300)
    report["sync_ipc"] = sync(worker, "student", "ipc", "gloo", 2, str(model_dir), engine_dtype, 300)
    ok = (all(s["changed"] and math.isfinite(s["loss"]) for s in steps.values()) and report["export_equal"]
          and all(s["idle_role_offloaded"] or not cuda for s in steps.values())
          and report["sync_gloo"]["ok"] and report["sync_ipc"]["ok"] and info["device"].startswith("cuda" if cuda else "cpu"))
    report["ok"] = ok
    print(json.dumps(report), flush=True)
    if cuda:  # last, on its own line: a failed NCCL group may take the process down
        print(json.dumps({"bench": "gpu_learner_nccl_same_gpu",
                          **sync(worker, "student", "collective", "nccl", 3, str(model_dir), engine_dtype, 60)}),
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
