"""Self-attention's CPU kernel: softmax(Q K^T / sqrt(d)) V from the fused qkv projection, forward and backward.

On a 2-core CPU, SDPA's flash kernel is 17 % of a ViT-Ti/16 training step, and feeding it costs a permuted copy of
the projection's gradient and a concatenation of dq, dk and dv. vitkit/model/_cpu_attention.c computes each (image,
head) pair's whole score matrix with torch's own MKL in one product while it is in cache, and writes the gradient
in the projection's layout. It runs for float32 CPU tensors in eager mode with no attention dropout, where torch's
BLAS is MKL (its sgemm and thread setting are looked up in torch's library); SDPA runs everywhere else: CUDA, other
dtypes, attention dropout, torch.compile and torch.export.
"""
from __future__ import annotations

import ctypes
import os

import torch
from torch.autograd.function import once_differentiable

try:
    from vitkit.model import _cpu_attention
except ImportError:  # built without a C compiler: SDPA runs
    _cpu_attention = None


def _bind_mkl() -> bool:
    """Hands MKL's sgemm and per-thread thread count, from torch's own library, to the kernel."""
    if _cpu_attention is None or not torch.backends.mkl.is_available():
        return False
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        gemm, set_threads = library.sgemm_, library.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):  # another platform's library name, or MKL's symbols not exported
        return False
    _cpu_attention.bind(ctypes.cast(gemm, ctypes.c_void_p).value, ctypes.cast(set_threads, ctypes.c_void_p).value)
    return True


KERNEL_AVAILABLE = _bind_mkl()


def _array(tensor: torch.Tensor):
    return tensor.detach().numpy()


class _AttentionOnCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor) -> torch.Tensor:
        batch, tokens, _, heads, width = qkv.shape
        qkv = qkv.contiguous()
        out = qkv.new_empty((batch, tokens, heads, width))
        lse = qkv.new_empty((batch, heads, tokens))
        _cpu_attention.forward(_array(qkv), _array(out), _array(lse), batch, tokens, heads, width, width**-0.5,
                               torch.get_num_threads())
        ctx.save_for_backward(qkv, out, lse)
        return out.view(batch, tokens, heads * width)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        qkv, out, lse = ctx.saved_tensors
        batch, tokens, _, heads, width = qkv.shape
        grad_qkv = torch.empty_like(qkv)  # every element is written
        _cpu_attention.backward(_array(qkv), _array(out), _array(grad.contiguous()), _array(lse), _array(grad_qkv),
                                batch, tokens, heads, width, width**-0.5, torch.get_num_threads())
        return grad_qkv


def uses_cpu_kernel(qkv: torch.Tensor) -> bool:
    """Whether self_attention(qkv) runs vitkit's CPU kernel rather than SDPA."""
    return (
        KERNEL_AVAILABLE and type(qkv) is torch.Tensor  # not a fake, functional or distributed tensor subclass
        and qkv.device.type == "cpu" and qkv.dtype == torch.float32 and qkv.layout == torch.strided
        and not torch.compiler.is_compiling()
    )


def self_attention(qkv: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Softmax attention of every token over every token, scaled by 1/sqrt(width).

    qkv: (batch, tokens, 3, heads, width), the fused projection's output; returns (batch, tokens, heads * width).
    """
    if dropout == 0.0 and uses_cpu_kernel(qkv):
        return _AttentionOnCpu.apply(qkv)
    batch, tokens, _, heads, width = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    x = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return x.transpose(1, 2).reshape(batch, tokens, heads * width)
