"""Process-group set-up from torchrun's environment, and wrapping the model for data parallelism."""
from __future__ import annotations

import dataclasses
import datetime
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from vitkit.errors import VitkitError


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine, sharing its CPU cores
    owns_group: bool = False

    def wait_for_all(self) -> None:
        """After a run that ended well on every rank: leave together. A rank that tore its group down while another
        still used it was seen to abort at exit ("terminate called without an active exception", FSDP on gloo)."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(dist_cfg, device: str = "auto") -> DistContext:
    """One process: nothing to set up. Under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU, with a timeout.
    `device` is train.device: a CPU run on a machine with GPUs still needs gloo, which NCCL cannot stand in for."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if "RANK" not in os.environ:
        raise VitkitError(f"WORLD_SIZE is {world_size} but RANK is not set: launch several processes with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dist.is_initialized():
        return DistContext(rank, world_size, local_rank, local_world_size, owns_group=False)
    backend = dist_cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise VitkitError("distributed.backend is nccl but no CUDA GPU is visible: use gloo or auto")
        torch.cuda.set_device(local_rank)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun reuses its store across restarts, so the new processes can read the dead ones' addresses
        # (pytorch/pytorch#135712) and fail to connect or wait for peers that no longer exist.
        warnings.warn("restarted on torchrun's shared store, which can hold the failed attempt's addresses: launch "
                      "torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (scripts/ do)")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=dist_cfg.timeout_s))
    return DistContext(rank, world_size, local_rank, local_world_size, owns_group=True)


def wrap_model(model: nn.Module, context: DistContext, device: torch.device, strategy: str,
               precision: str = "fp32") -> nn.Module:
    """Several processes: DDP (a full replica per rank), or FSDP2 (each block's parameters, gradients and optimizer
    state sharded across ranks and gathered block by block; for models whose replicas do not fit). Gradients are
    averaged across ranks either way. One process: the plain model."""
    if context.world_size <= 1:
        return model
    if strategy == "fsdp":
        return _fully_shard(model, precision)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _fully_shard(model: nn.Module, precision: str) -> nn.Module:
    """Shards in place: each transformer block is one unit (gathered just before it runs, freed after), the
    embeddings, final norm and head the root unit. Under bf16/fp16 the gathers move half-size parameters while
    gradients are still averaged in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
