"""Moving an idle role's DeepSpeed states to host memory and back (`learner.offload_inactive`).

The examiner and the student share each rank's device and train in turn, so the idle one's states can
wait in host memory. On CPU the states "move" to the device they are already on (unpinned: no copies), so
CI runs the same bookkeeping as a GPU (DeepSpeed's offloaded-state set, parameter buffers re-bound, gradient
partitions re-mapped, gradient buckets freed and re-made); pinned buffers and the transfers run only on GPUs.
DeepSpeed saves and loads only resident states, so those calls bring an idle role back first; a gather needs
only the weights' partitions, which stay (`include`).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def include(engine) -> list | None:
    """What `offload_states` may move (None: all). The weights' own partitions (bf16 on a GPU, 2 B x P / N per
    rank) always stay: a publish or an export gathers them without bringing back the optimizer states and
    gradients (16 B x P / N) it does not read. DeepSpeed's ZeRO-3 moves the fp32 master weights and the Adam
    moments only for its own FusedAdam; with torch's AdamW those two stay resident. (With frozen parameters,
    LoRA's base, keeping the partitions is also what DeepSpeed 0.19 needs: it re-binds every module parameter
    into the trained ones' buffer on offload and fails.)"""
    from deepspeed.ops.adam import FusedAdam
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as S

    if engine.zero_optimization_stage() != 3:
        return None
    fused = isinstance(getattr(engine.optimizer, "optimizer", None), FusedAdam)
    keep = {S.lp_params} | (set() if fused else {S.hp_params, S.optim_states})
    return [s for s in S if s not in keep]


def offload(engine, pin: bool) -> bool:
    """Move the engine's states to host memory; False (and a warning) where DeepSpeed cannot."""
    try:
        engine.offload_states(include=include(engine), pin_memory=pin)
        return True
    except (AssertionError, NotImplementedError, AttributeError) as e:  # ZeRO-0 or an unsupported optimizer
        log.warning("offload not available (%s); keeping the states resident", e)
        return False


def reload(engine) -> None:
    engine.reload_states()


def offloaded_states(engine) -> list[str]:
    """The states DeepSpeed holds offloaded now (its ZeRO optimizers track them)."""
    return sorted(s.value for s in getattr(engine.optimizer, "offloaded_states", ()))
