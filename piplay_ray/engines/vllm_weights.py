"""Full-weight updates of a vLLM engine, worker side: code that runs in vLLM's worker processes.

Apart from the engine because vLLM imports :class:`WeightLoader` by its dotted path in each worker process
(``worker_extension_cls``) and mixes it into its worker class; nothing here runs in the engine's process
except :func:`write_shared`, which writes the file that :meth:`WeightLoader.piplay_reload` maps.

Tensors never pass through vLLM's RPC (it msgspec-serialises them): either every worker receives a
collective broadcast itself (the RPC carries only a small ticket, the worker joins its role's group at rank
ticket rank + its own rank, so tensor-parallel workers take distinct ranks), or, for the object store, the
tensors are written once to a safetensors file in shared memory (in the dtype they arrive in) and each
worker maps it. After the reload, the CPU backend's prepacked GEMM handle of every `VocabParallelEmbedding`
(embedding and LM head) is rebuilt, since `reload_weights` only repacks the linear layers (DESIGN.md
section 4).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable

import torch

from piplay_ray.engines.vllm_lora import AdapterReceiving, shm_dir
from piplay_ray.weight_sync import Receiver, receiver_for


class WeightLoader(AdapterReceiving):
    """vLLM worker extension (mixed into the worker class): reload weights in place, from a shared-memory
    file or from the role's collective broadcast."""

    def _piplay_load(self, weights) -> int:
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
        from vllm.platforms import current_platform

        count = 0

        def counted():
            nonlocal count
            for item in weights:
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted())
        if current_platform.is_cpu():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            for module in self.model_runner.get_model().modules():
                if isinstance(module, VocabParallelEmbedding) and hasattr(module, "weight"):
                    dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        return count

    def piplay_reload(self, path: str) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return self._piplay_load((n, f.get_tensor(n)) for n in list(f.keys()))

    def _piplay_rx(self, ticket: dict) -> Receiver:
        import torch
        from vllm.platforms import current_platform

        device = torch.device("cpu") if current_platform.is_cpu() else self.device
        self._piplay_receiver = receiver_for(ticket, device, getattr(self, "_piplay_receiver", None))
        return self._piplay_receiver

    def piplay_receive(self, ticket: dict) -> list[int]:
        """Receive one pushed sync as rank `ticket['rank'] + self.rank`; returns [version, tensors]."""
        rx = self._piplay_rx(ticket)
        n = self._piplay_load(rx.receive(ticket, rank_offset=self.rank))
        return [rx.version, n]


SHARED_PREFIX = "piplay-weights-"  # + the writer's pid: `sweep_orphans` knows whose file it is


def write_shared(weights: Iterable[tuple[str, torch.Tensor]], folder: str | None = None) -> str:
    """Save tensors to one safetensors file in shared memory (tensors sharing storage are copied)."""
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, t in weights:
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[name] = t.clone() if key in seen else t
        seen.add(key)
    folder = folder or shm_dir()
    fd, path = tempfile.mkstemp(prefix=f"{SHARED_PREFIX}{os.getpid()}-", suffix=".safetensors", dir=folder)
    os.close(fd)
    save_file(tensors, path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_orphans(folder: str | None = None) -> list[str]:
    """Delete the weight files of writers that are gone. The writer deletes its file after each sync, but
    one killed mid-sync (a run killed or out of memory) leaves a model's size of shared memory held until
    reboot; every engine start on the host sweeps them. Returns the deleted paths."""
    folder = folder or shm_dir()
    pattern = re.compile(re.escape(SHARED_PREFIX) + r"(\d+)-.*\.safetensors")
    gone = []
    for name in os.listdir(folder):
        m = pattern.fullmatch(name)
        if m and not _alive(int(m[1])):
            path = os.path.join(folder, name)
            try:
                os.unlink(path)
                gone.append(path)
            except FileNotFoundError:  # another engine swept it first
                pass
    return gone
