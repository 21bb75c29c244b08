"""GELU's tanh form (MindSpore's, vitkit's default numerics) with vitkit's own CPU kernels where they help.

torch's CPU kernel for the tanh form evaluates a full tanh per element: 2.3x slower forward and 1.8x slower
backward than the erf form, 6 % of a ViT-Ti/16 CPU training step. vitkit/model/_gelu_tanh.c computes the same
function as x * sigmoid(2u) with one vectorized exp per element (AVX2). It runs for float32 CPU tensors in eager
mode on CPUs with AVX2; torch's kernel runs everywhere else: CUDA, other dtypes, other CPUs, and inside
torch.compile and torch.export, whose compilers fuse the activation themselves and export it as one Gelu node.
The kernel can also add a linear layer's bias as it reads the product (linear_gelu_tanh), which spares the pass
that writes the bias into every output row before the product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from vitkit.model.cpu_eager import eager_cpu_float32

try:
    from vitkit.model import _gelu_tanh
except ImportError:  # built without a C compiler: torch's kernel runs
    _gelu_tanh = None

KERNEL_AVAILABLE = bool(_gelu_tanh is not None and _gelu_tanh.vectorized)


def _array(tensor: torch.Tensor):
    return tensor.detach().numpy()


class _TanhGeluOnCpu(torch.autograd.Function):
    """gelu_tanh(x + bias) with the bias (optional, one value per last-dim element) added inside the kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        # A numpy view makes its storage non-resizable; FSDP2 frees parameters by resizing theirs, so the kernel
        # reads a copy of the bias (one row of floats).
        bias = None if bias is None else bias.detach().clone()
        out = torch.empty_like(x)  # x is contiguous, and so is its copy
        _gelu_tanh.forward(_array(x), _array(out), torch.get_num_threads(), None if bias is None else _array(bias))
        ctx.save_for_backward(x, bias)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, bias = ctx.saved_tensors
        grad = grad.contiguous()
        out = torch.empty_like(x)  # x is contiguous, and so is its copy
        _gelu_tanh.backward(_array(grad), _array(x), _array(out), torch.get_num_threads(),
                            None if bias is None else _array(bias))
        bias_grad = None
        if bias is not None and ctx.needs_input_grad[1]:
            bias_grad = out.reshape(-1, bias.numel()).sum(0).reshape(bias.shape)
        return out, bias_grad


def uses_vitkit_kernel(x: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether gelu_tanh(x, bias) runs vitkit's CPU kernel rather than torch's."""
    if bias is None:
        return KERNEL_AVAILABLE and eager_cpu_float32(x)
    return (
        KERNEL_AVAILABLE and eager_cpu_float32(x, bias)
        and bias.dim() == 1 and x.dim() > 0 and bias.numel() == x.shape[-1] > 0
    )


def gelu_tanh(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.gelu(x + bias, approximate="tanh") (bias optional, one value per last-dim element), by vitkit's kernel
    where uses_vitkit_kernel says so; the kernel adds the bias as it reads x, with no pass of its own."""
    if uses_vitkit_kernel(x, bias):
        return _TanhGeluOnCpu.apply(x, bias)
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_tanh(F.linear(x, weight, bias)); where vitkit's kernel runs, the product is made without the bias and the
    kernel adds it, which saves the pass that writes the bias into every output row before the product."""
    if (bias is not None and uses_vitkit_kernel(x) and eager_cpu_float32(weight, bias)
            and bias.numel() == weight.shape[0]):
        return _TanhGeluOnCpu.apply(F.linear(x, weight), bias)
    return gelu_tanh(F.linear(x, weight, bias))


class TanhGELU(nn.GELU):
    """nn.GELU(approximate="tanh"), computed by gelu_tanh."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)
