"""What multi-process training needs beyond the Trainer: FSDP2 on CPU, and agreeing across ranks.

* `enable_fsdp2_on_cpu`: accelerate (1.15) turns `distributed_type: FSDP` into FSDP only for
  accelerator devices; with `use_cpu` the processes join a gloo group as MULTI_CPU and train as
  plain DDP, silently. FSDP2 itself (`torch.distributed.fsdp.fully_shard`) runs on CPU over gloo,
  so when `accelerate launch` asked for FSDP version 2 (its environment variables) and the run is
  on the CPU, the shared `AcceleratorState` is promoted to FSDP with the plugin read from that
  environment, before the Trainer builds its `Accelerator`. FSDP v1 stays refused on CPU.
  This is how CI runs the sharded path (accelerate_configs/fsdp_cpu_2proc.yaml, tests/test_fsdp.py).
* `any_rank`: a guard that stops on one rank and not on the others deadlocks the next collective,
  so every stop decision (NaN/Inf loss, gradient or weights) is all-reduced first.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def fsdp2_requested() -> bool:
    """`accelerate launch` with an FSDP config of `fsdp_version: 2` (read from its environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION") == "2"


def enable_fsdp2_on_cpu(accelerator, training_args) -> bool:
    """Promote the Trainer's CPU process group to FSDP2 when accelerate was asked for it. True if done.

    Runs right after the Trainer built its `Accelerator` (before the model is prepared): the
    plugin is what `Accelerator()` itself would have built from accelerate's environment.
    """
    if not getattr(training_args, "use_cpu", False):
        return False
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not fsdp2_requested():
        raise ValueError(
            "FSDP version 1 does not run on the CPU: use fsdp_version: 2 (accelerate_configs/fsdp_cpu_2proc.yaml)"
        )
    if not fsdp2_requested():
        return False
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    from accelerate.state import PartialState

    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # every setting from accelerate's environment
    # both shared states: every later `AcceleratorState()` re-reads the PartialState's fields
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    logger.info("FSDP2 on %d CPU processes over gloo", state.num_processes)
    return True


def any_rank(flag: bool) -> bool:
    """True on every process when `flag` is true on any (one all-reduce; the plain flag when alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_names(names: list[str]) -> list[list[str]]:
    """Every process's list of names (one `all_gather_object`; `[names]` when alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [list(names)]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(names))
    return gathered


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this process holds (FSDP2 parameters and gradients are DTensors)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


__all__ = ["any_rank", "enable_fsdp2_on_cpu", "fsdp2_requested", "gather_names", "local_tensor"]
