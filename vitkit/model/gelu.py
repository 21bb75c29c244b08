"""GELU's tanh form (MindSpore's, vitkit's default numerics) with vitkit's own CPU kernels where they help.

torch's CPU kernel for the tanh form evaluates a full tanh per element, markedly slower forward and backward
than the erf form, which shows in a small ViT's CPU training step. vitkit/model/_gelu_tanh.c computes the same
function as x * sigmoid(2u) with one vectorized exp per element (AVX2). It runs for float32 CPU tensors in eager
mode on CPUs with AVX2; torch's kernel runs everywhere else: CUDA, other dtypes, other CPUs, and inside
torch.compile and torch.export, whose compilers fuse the activation themselves and export it as one Gelu node.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

try:
    from vitkit.model import _gelu_tanh
except ImportError:  # built without a C compiler: torch's kernel runs
    _gelu_tanh = None

KERNEL_AVAILABLE = bool(_gelu_tanh is not None and _gelu_tanh.vectorized)


def _array(tensor: torch.Tensor):
    return tensor.detach().numpy()


class _TanhGeluOnCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)  # x is contiguous, and so is its copy
        _gelu_tanh.forward(_array(x), _array(out), torch.get_num_threads())
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        out = torch.empty_like(x)  # x is contiguous, and so is its copy
        _gelu_tanh.backward(_array(grad), _array(x), _array(out), torch.get_num_threads())
        return out


def uses_vitkit_kernel(x: torch.Tensor) -> bool:
    """Whether gelu_tanh(x) runs vitkit's CPU kernel rather than torch's."""
    return (
        KERNEL_AVAILABLE and type(x) is torch.Tensor  # not a fake, functional or distributed tensor subclass
        and x.device.type == "cpu" and x.dtype == torch.float32 and x.layout == torch.strided
        and not torch.compiler.is_compiling()
    )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), by vitkit's kernel where uses_vitkit_kernel(x) says so."""
    if uses_vitkit_kernel(x):
        return _TanhGeluOnCpu.apply(x)
    return F.gelu(x, approximate="tanh")


class TanhGELU(nn.GELU):
    """nn.GELU(approximate="tanh"), computed by gelu_tanh."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)
