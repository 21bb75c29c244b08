"""When vitkit's eager float32 CPU paths may replace torch's ops: plain tensors, no compiler, no autocast.

These paths (the tanh-GELU kernel with a linear layer's bias folded in, a residual added inside the next matrix
product) compute what torch's ops compute, with fewer passes over memory. Compilers (torch.compile, torch.export)
fuse such work themselves and must see torch's ops, and autocast changes the dtypes the ops run in, so both keep
torch's path.
"""
from __future__ import annotations

import torch
from torch import nn


def eager_cpu_float32(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is a plain (or Parameter) float32 strided CPU tensor, outside compilers and autocast."""
    return (
        all(
            type(tensor) in (torch.Tensor, nn.Parameter)  # not a fake, functional or distributed tensor subclass
            and tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.layout == torch.strided
            for tensor in tensors
        )
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
    )
