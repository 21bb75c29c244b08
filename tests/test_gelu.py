"""vitkit's tanh-GELU CPU kernels against float64 truth and torch's own kernel: values, gradients, whole models."""
import os

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.model import gelu


def test_kernel_is_built():
    # setup.py builds it optionally (torch's kernel runs without it, and on CPUs without AVX2). .ci/run sets
    # VITKIT_REQUIRE_EXTENSIONS=1, so there a missing build fails.
    if gelu._gelu_tanh is None and os.environ.get("VITKIT_REQUIRE_EXTENSIONS") != "1":
        pytest.skip("vitkit.model._gelu_tanh is not built (no C compiler): torch's tanh GELU runs")
    assert gelu._gelu_tanh is not None, "vitkit.model._gelu_tanh is not built: install a C compiler, reinstall vitkit"


needs_kernel = pytest.mark.skipif(not gelu.KERNEL_AVAILABLE, reason="vitkit's tanh-GELU kernel is not available")


def _inputs() -> torch.Tensor:
    # Every region of the curve: the exp clamp (|x| > ~25), the tails, zero and its sign, tiny values, and a length
    # that is not a multiple of the 8-float vectors, so the scalar tail runs too.
    grid = torch.linspace(-60.0, 60.0, 120_001)
    normal = torch.randn(50_003, generator=torch.Generator().manual_seed(0)) * 3
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 87.0, -87.0, 1e4, -1e4])
    return torch.cat([grid, normal, special])


@needs_kernel
def test_values_and_gradients_match_float64_truth_at_least_as_well_as_torchs_kernel():
    x = _inputs()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    truth_x = x.double().requires_grad_()
    F.gelu(truth_x, approximate="tanh").backward(grad_out.double())
    truth = F.gelu(x.double(), approximate="tanh")

    ours_x = x.clone().requires_grad_()
    ours = gelu.gelu_tanh(ours_x)
    ours.backward(grad_out)
    torch_x = x.clone().requires_grad_()
    theirs = F.gelu(torch_x, approximate="tanh")
    theirs.backward(grad_out)

    assert ours.dtype == torch.float32 and ours.shape == x.shape and ours.grad_fn is not None
    value_error = (ours.double() - truth).abs() / truth.abs().clamp_min(1.0)
    grad_error = (ours_x.grad.double() - truth_x.grad).abs() / truth_x.grad.abs().clamp_min(1.0)
    assert value_error.max() < 1e-6 and grad_error.max() < 1e-6
    # torch's kernel on the same float32 inputs, for scale: vitkit's is no further from the truth.
    assert value_error.max() <= 1.5 * ((theirs.double() - truth).abs() / truth.abs().clamp_min(1.0)).max()
    assert grad_error.max() <= 1.5 * ((torch_x.grad.double() - truth_x.grad).abs() / truth_x.grad.abs().clamp_min(1.0)).max()
    assert torch.equal(ours[x == 0], x[x == 0]) and torch.equal(torch.signbit(ours[x == 0]), torch.signbit(x[x == 0]))
    assert torch.isnan(gelu.gelu_tanh(torch.tensor([float("nan")]))).all()


@needs_kernel
def test_the_work_split_over_threads_covers_every_element_once():
    # Stretches of at least 2^17 elements per thread: 1,000,003 elements give up to 7 stretches and a scalar tail.
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(4)) * 4
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    single_forward, single_backward = torch.empty_like(x), torch.empty_like(x)
    gelu._gelu_tanh.forward(x.numpy(), single_forward.numpy(), 1)
    gelu._gelu_tanh.backward(grad.numpy(), x.numpy(), single_backward.numpy(), 1)
    assert torch.allclose(single_forward, F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-5)
    for threads in (2, 3, 7, 64):
        forward, backward = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        gelu._gelu_tanh.forward(x.numpy(), forward.numpy(), threads)
        gelu._gelu_tanh.backward(grad.numpy(), x.numpy(), backward.numpy(), threads)
        assert torch.equal(forward, single_forward) and torch.equal(backward, single_backward)


def test_the_kernel_refuses_buffers_it_cannot_read():
    kernel = gelu._gelu_tanh
    if kernel is None:
        pytest.skip("vitkit.model._gelu_tanh is not built")
    x = torch.randn(16)
    with pytest.raises(ValueError, match="float32"):
        kernel.forward(x.double().numpy(), torch.empty(16, dtype=torch.float64).numpy())
    with pytest.raises(ValueError, match="one length"):
        kernel.forward(x.numpy(), torch.empty(8).numpy())
    with pytest.raises(BufferError):
        kernel.forward(x.numpy(), x.numpy().copy().data.toreadonly())  # the output must be writable
    with pytest.raises((BufferError, ValueError)):  # numpy's own refusal is a ValueError
        kernel.forward(x.reshape(4, 4).numpy().T, torch.empty(16).numpy())  # not C-contiguous


@needs_kernel
def test_layouts_shapes_and_modes():
    base = torch.randn(6, 5, 24, generator=torch.Generator().manual_seed(2))
    for x in (base, base.transpose(0, 2), base[:, 1:4, ::3], torch.randn(3), torch.empty(0), torch.tensor(0.7)):
        assert gelu.uses_vitkit_kernel(x)
        assert torch.allclose(gelu.gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-6)
    with torch.inference_mode():
        assert torch.allclose(gelu.gelu_tanh(base), F.gelu(base, approximate="tanh"), atol=1e-6, rtol=1e-6)
    for other in (base.double(), base.bfloat16(), base.half()):
        assert not gelu.uses_vitkit_kernel(other)
        assert torch.equal(gelu.gelu_tanh(other), F.gelu(other, approximate="tanh"))


def test_compile_and_export_trace_torchs_gelu():
    # Compilers fuse the activation themselves (and ONNX gets one Gelu node), so they must see aten.gelu.
    program = torch.export.export(gelu.TanhGELU(), (torch.randn(4, 8),))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets == ["aten.gelu.default"]
    compiled = torch.compile(gelu.gelu_tanh, backend="eager", fullgraph=True)  # a graph break would raise
    x = torch.randn(4, 8)
    assert torch.allclose(compiled(x), F.gelu(x, approximate="tanh"), atol=1e-6)


@needs_kernel
def test_a_mindspore_style_model_trains_the_same_with_either_kernel(monkeypatch):
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16", style="mindspore", image_size=32, depth=2, embed_dim=48,
                                num_heads=3, mlp_dim=96, num_classes=5, drop_rate=0, proj_drop_rate=0,
                                mlp_drop_rate=0, drop_path_rate=0)
    assert isinstance(model.blocks[0].mlp.act, gelu.TanhGELU) and model.blocks[0].mlp.act.approximate == "tanh"
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def logits_and_grads():
        model.zero_grad()
        logits = model(images)
        logits.square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    ours = logits_and_grads()
    monkeypatch.setattr(gelu, "KERNEL_AVAILABLE", False)
    theirs = logits_and_grads()
    assert torch.allclose(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    for mine, reference in zip(ours[1], theirs[1]):
        assert torch.allclose(mine, reference, atol=1e-5, rtol=1e-4)
