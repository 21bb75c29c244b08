"""What only an NVIDIA GPU can show: mixed-precision steps against fp32 on the CPU, eval counts, fused AdamW,
checkpoints across devices, export from a GPU model, DDP over NCCL, pinned loader memory, `train.precision=auto`.

Every test is marked `cuda` and skipped where no GPU is visible. VITKIT_CUDA_TESTS_ON=cpu runs them anyway with the
CPU standing in for the GPU, only to execute their code paths on a machine without one: the comparisons are then
CPU against CPU, and prove nothing about CUDA.
"""
import copy
import itertools
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

import vitkit
from conftest import tiny_config, write_image_folder
from vitkit.data.folder import ImageFolderDataset, list_image_folder
from vitkit.data.loader import ShardSampler, build_loader
from vitkit.data.transforms import eval_transform, normalize_batch
from vitkit.deploy.export import export_model
from vitkit.engine.build import autocast_context, resolve_precision
from vitkit.engine.distributed import DistContext, wrap_model
from vitkit.engine.evaluate import evaluate
from vitkit.engine.optim import build_optimizer
from vitkit.engine.trainer import Trainer, train
from vitkit.model.loading import load_model

DRY_RUN = os.environ.get("VITKIT_CUDA_TESTS_ON", "") == "cpu"
# The device every test treats as "the GPU": cuda:0, or the CPU in a dry run.
GPU = torch.device("cpu") if DRY_RUN else torch.device("cuda", 0)
ON_CUDA = GPU.type == "cuda"
CPU = torch.device("cpu")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(),
                       reason="needs an NVIDIA GPU (VITKIT_CUDA_TESTS_ON=cpu dry-runs these tests on the CPU)"),
]

TINY_ARCH = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=32, num_classes=3)
# Nothing random in a training step but the data order: no dropout, stochastic depth or mixup, so that two devices
# given the same weights and batches compute the same step up to their arithmetic.
NO_RANDOMNESS = ("--mixup=0", "--loss_name=ce_smooth", "--model.drop_rate=0", "--model.proj_drop_rate=0",
                 "--model.mlp_drop_rate=0", "--model.attn_drop_rate=0", "--model.drop_path_rate=0")
# AdamW with eps = 1 steps by lr·g/(|g| + 1) ≈ lr·g at first, not lr·sign(g): a weight update then differs between
# devices as much as the gradients do, instead of flipping sign wherever a gradient is near zero. Weight decay off, so
# the update is the gradients' alone; lr 0.1 makes it large against float32 rounding of the weights.
LINEAR_UPDATES = ("--optimizer.eps=1.0", "--weight_decay=0", "--lr_max=0.1")


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(GPU)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda") / "data"
    write_image_folder(root / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)  # 36 images: 4 steps of 8
    write_image_folder(root / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Weights trained for two epochs on the CPU: confident on the class-coloured images, unlike the init's."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(data, out, "--train.device=cpu", "--lr_max=0.003", "--eval_interval=2"))
    return out / "vit_tiny_patch16-2_4.safetensors"


@pytest.fixture
def exact_fp32():
    """cuDNN runs fp32 convolutions (the patch embedding) in TF32 by default on Ampere and later, about 1e-3
    relative: off here, where GPU logits stand as the fp32 truth."""
    if not ON_CUDA:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---- 1. mixed-precision training steps -----------------------------------------------------------------------------
# Measured on an H200 (torch 2.11): logits 6.3e-3 (bf16) and 5.1e-4 (fp16); updates 5.4e-3 and 7.0e-4; weights 6.1e-3
# and 1.1e-3. Each tolerance is 3-6x that.
# Norm-wise relative error of the first forward's logits against fp32 on the CPU. bf16 keeps 8 significant bits
# (rounding 2^-9 ≈ 2e-3 per operand), fp16 11 bits (2^-12 ≈ 2.4e-4); a few roundings build up over the two blocks.
LOGIT_TOLERANCE = {"bf16": 2e-2, "fp16": 3e-3}
# Norm-wise relative error of the three steps' total weight update (an almost linear function of the gradients, see
# LINEAR_UPDATES): the backward pass adds its own roundings to the forward's.
UPDATE_TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3}
# Largest difference of any final weight, relative to the largest update any weight got: one element's worst case.
WEIGHT_TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3}


def _steps(trainer: Trainer, start: dict, batches) -> tuple[torch.Tensor, list[float], dict]:
    """Load `start`, run the batches through _train_step: (first forward's logits, losses, final weights) on the CPU."""
    trainer.model.load_state_dict(start)
    logits = []
    hook = trainer.model.register_forward_hook(
        lambda module, args, output: logits.append(output.detach().float().cpu()))
    try:
        losses = [float(trainer._train_step(images, labels)) for images, labels in batches]
    finally:
        hook.remove()
    _sync()
    return logits[0], losses, {name: p.detach().cpu().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_the_gpu_follow_fp32_on_the_cpu(data, tmp_path, precision):
    reference = Trainer(tiny_config(data, tmp_path / "cpu", "--train.device=cpu", "--train.precision=fp32",
                                    *NO_RANDOMNESS, *LINEAR_UPDATES))
    trainer = Trainer(tiny_config(data, tmp_path / "gpu", f"--train.device={GPU}", f"--train.precision={precision}",
                                  *NO_RANDOMNESS, *LINEAR_UPDATES))
    assert trainer.device == GPU and trainer.precision == precision and reference.precision == "fp32"
    assert trainer.scaler.is_enabled() == (precision == "fp16") and not reference.scaler.is_enabled()
    start = {name: tensor.clone() for name, tensor in reference.model.state_dict().items()}
    reference.train_loader.set_epoch(0)
    batches = [(images, labels) for images, labels, _, _ in itertools.islice(reference.train_loader, 3)]
    assert len(batches) == 3 and all(images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
                                     for images, _ in batches)

    ref_logits, ref_losses, ref_weights = _steps(reference, start, batches)
    logits, losses, weights = _steps(trainer, start, batches)

    assert all(math.isfinite(loss) for loss in losses + ref_losses), (losses, ref_losses)
    logit_error = _relative_error(logits, ref_logits)
    update = torch.cat([(weights[name] - start[name]).flatten() for name in weights])
    ref_update = torch.cat([(ref_weights[name] - start[name]).flatten() for name in weights])
    update_error = _relative_error(update, ref_update)
    weight_diff = max((weights[name] - ref_weights[name]).abs().max().item() for name in weights)
    weight_error = weight_diff / ref_update.abs().max().item()
    print(f"{precision}: logits {logit_error:.2e}, update {update_error:.2e}, weights {weight_error:.2e}, "
          f"losses {losses} vs {ref_losses}")
    assert logit_error <= LOGIT_TOLERANCE[precision]
    assert ref_update.abs().max() > 1e-3  # the steps did move the weights: the comparison below means something
    assert update_error <= UPDATE_TOLERANCE[precision]
    assert weight_error <= WEIGHT_TOLERANCE[precision]
    # Parameters stay float32 on the device whatever the compute precision.
    assert all(p.dtype == torch.float32 and p.device == GPU for p in trainer.model.parameters())
    if precision == "fp16":
        scale = trainer.scaler.get_scale()
        assert scale > 0 and math.log2(scale).is_integer()
        # The dynamic scaler halves its scale on a step it skips for overflow, and grows it only after 2000 good
        # steps: still the configured 1024 means all three steps were taken.
        assert scale == trainer.cfg.train.loss_scale == 1024.0


# ---- 2. evaluation counts ----------------------------------------------------------------------------------------
def test_eval_counts_on_the_gpu_equal_the_cpus(data, trained):
    samples, _ = list_image_folder(data / "val")

    def loader():
        dataset = ImageFolderDataset(samples, eval_transform(32))
        return build_loader(dataset, ShardSampler(len(samples), shuffle=False, pad=False), 4, 0, drop_last=False)

    cpu_model = load_model(trained).eval()
    gpu_model = copy.deepcopy(cpu_model).to(GPU)
    # Independent truth: every image's own prediction on the CPU, the label from its folder.
    margins, hits = [], 0
    with torch.no_grad():
        for images, labels, _, _ in loader():
            logits = cpu_model(normalize_batch(images))
            top2 = logits.topk(2, dim=1).values
            margins += (top2[:, 0] - top2[:, 1]).tolist()
            hits += int((logits.argmax(1) == labels).sum())
    # The counts can only be expected equal where no prediction is a near tie: the GPU's fp32 (TF32 convolutions by
    # default) moves these logits by ~1e-3 at most, so every top-1 must lead its runner-up by more than 1e-2.
    assert min(margins) > 1e-2, margins

    cpu = evaluate(cpu_model, loader(), CPU, "fp32")
    gpu = evaluate(gpu_model, loader(), GPU, "fp32")
    assert cpu.total == gpu.total == len(samples) == 11
    assert cpu.correct1 == hits
    assert (gpu.correct1, gpu.correct5, gpu.total, gpu.failed) == (cpu.correct1, cpu.correct5, cpu.total, cpu.failed)
    assert gpu.correct5 == 11  # 3 classes: the truth is always among the top 5
    assert not gpu_model.training and next(gpu_model.parameters()).device == GPU


# ---- 3. fused AdamW ----------------------------------------------------------------------------------------------
def test_fused_adamw_on_the_gpu_steps_like_the_foreach_one():
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16", **TINY_ARCH).to(GPU)
    twin = copy.deepcopy(model)
    start = {name: param.detach().clone() for name, param in model.named_parameters()}
    fused = build_optimizer(model, "adamw", 1e-2, (0.9, 0.999), 1e-8, 0.05, "beta,bias", False, fused=True)
    unfused = build_optimizer(twin, "adamw", 1e-2, (0.9, 0.999), 1e-8, 0.05, "beta,bias", False, fused=False)
    assert fused.defaults["fused"] and not unfused.defaults["fused"]
    assert unfused.defaults["foreach"] is None  # torch picks its foreach kernels for CUDA tensors (a loop on the CPU)
    decays = [[group["weight_decay"] for group in optimizer.param_groups] for optimizer in (fused, unfused)]
    assert decays == [[0.05, 0.0], [0.05, 0.0]]
    generator = torch.Generator().manual_seed(1)
    for lr in (1e-2, 3e-2, 5e-3):
        images = torch.randn(4, 3, 32, 32, generator=generator).to(GPU)
        labels = torch.randint(0, 3, (4,), generator=generator).to(GPU)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        for param, other in zip(model.parameters(), twin.parameters()):
            other.grad = param.grad.clone()  # the same gradients for both optimizers
        for optimizer in (fused, unfused):
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
    _sync()
    worst = 0.0
    for (name, param), other in zip(model.named_parameters(), twin.parameters()):
        assert param.device == GPU
        update, other_update = param.detach() - start[name], other.detach() - start[name]
        assert update.abs().max() > 1e-3, name  # every tensor moved by about the lrs' sum, 4.5e-2
        worst = max(worst, ((update - other_update).abs().max() / update.abs().max()).item())
        # The same update in float32, but CUDA's fused kernel forms the bias corrections 1 - beta^t in float32 from
        # float32 betas, where 1 - 0.999^t keeps only 4 digits (foreach forms them in float64): up to ~3e-5 of
        # the update (7.9e-6 measured on an H200), so 1e-4 of it; atol is 2 float32 roundings of weights near 1
        # (1.2e-7 each), which the update inherits.
        torch.testing.assert_close(update, other_update, rtol=1e-4, atol=2.5e-7,
                                   msg=lambda text: f"{name}: {text}")
    print(f"fused vs foreach AdamW: largest update difference {worst:.2e} of the tensor's largest update")
    for param in model.parameters():  # the moments live with the parameter
        assert all(value.device == param.device for value in fused.state[param].values())


# ---- 4. checkpoints across devices -------------------------------------------------------------------------------
@pytest.mark.parametrize("writer, reader", [(str(GPU), "cpu"), ("cpu", str(GPU))], ids=["gpu-to-cpu", "cpu-to-gpu"])
def test_a_checkpoint_written_on_one_device_resumes_on_the_other(data, tmp_path, writer, reader):
    out = tmp_path / "run"
    first = Trainer(tiny_config(data, out, f"--train.device={writer}", "--max_epoch=1"))
    assert first.device.type == torch.device(writer).type and first.fit()["global_step"] == 4
    saved = load_file(out / "vit_tiny_patch16-1_4.safetensors")
    state = torch.load(out / "vit_tiny_patch16-1_4.pt", map_location="cpu", weights_only=True)

    resumed = Trainer(tiny_config(data, out, f"--train.device={reader}", "--max_epoch=2", "--train.resume=auto"))
    reader_device = torch.device(reader)
    assert resumed.device.type == reader_device.type
    assert (resumed.progress.epoch, resumed.progress.step_in_epoch, resumed.progress.global_step) == (1, 0, 4)
    model_state = resumed.model.state_dict()
    assert model_state.keys() == saved.keys()
    for name, tensor in model_state.items():
        assert tensor.device.type == reader_device.type and torch.equal(tensor.cpu(), saved[name]), name
    for name, param in resumed.model.named_parameters():
        moments, saved_moments = resumed.optimizer.state[param], state["optimizer"]["state"][name]
        for key in ("exp_avg", "exp_avg_sq"):
            assert moments[key].device == param.device and torch.equal(moments[key].cpu(), saved_moments[key]), name
        assert float(moments["step"]) == 4.0
    summary = resumed.fit()
    assert summary["global_step"] == 8
    final = load_file(out / "vit_tiny_patch16-2_4.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in final.values())
    assert not torch.equal(final["head.weight"], saved["head.weight"])  # the second epoch trained on


# ---- 5. export from a GPU model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("file_format", ["ONNX", "PT2"])
def test_export_of_a_gpu_model_matches_its_logits_and_leaves_it_where_it_was(trained, tmp_path, file_format,
                                                                             exact_fp32):
    if file_format == "ONNX":
        for module in ("onnx", "onnxruntime", "onnxscript"):
            pytest.importorskip(module)
    model = load_model(trained).to(GPU).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(images.to(GPU)).cpu()
    path = tmp_path / f"model.{file_format.lower()}"
    result = export_model(model, path, file_format, dynamic_batch=True)
    assert path.is_file() and result.max_abs_diff <= 1e-4
    if file_format == "ONNX":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    else:
        with torch.no_grad():
            outputs = torch.export.load(path).module()(images)
    # float32 on both sides (TF32 off, see exact_fp32): only the order of sums differs, ~1e-6 on logits near 1;
    # 1e-4 is export_model's own acceptance bound.
    assert (outputs - expected).abs().max().item() <= 1e-4
    # The caller's model must still be the caller's: on its device, computing the same logits. export_model works
    # on a CPU model; moving the caller's module there in place (model.cpu()) would break a GPU user's next call.
    assert {param.device for param in model.parameters()} == {GPU}
    with torch.no_grad():
        again = model(images.to(GPU)).cpu()
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-6)  # the same kernels on the same input


# ---- 6. DDP over NCCL ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_in_one_process_gives_the_plain_models_gradients(monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1", "RANK": "0",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    backend = "nccl" if ON_CUDA else "gloo"
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16", **TINY_ARCH).to(GPU)
    plain = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, 32, 32, generator=generator).to(GPU)
    labels = torch.randint(0, 3, (4,), generator=generator).to(GPU)
    if ON_CUDA:
        torch.cuda.set_device(GPU)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        assert dist.get_backend() == backend and dist.get_world_size() == 1
        # wrap_model wraps only when the context says several processes; the group itself holds this one rank, all
        # that one GPU can (NCCL refuses two ranks on one device).
        context = DistContext(rank=0, world_size=2, local_rank=0, local_world_size=1)
        wrapped = wrap_model(model, context, GPU, "ddp", "fp32")
        assert isinstance(wrapped, DistributedDataParallel)
        assert wrapped.device_ids == ([GPU.index] if ON_CUDA else None)
        F.cross_entropy(wrapped(images), labels).backward()  # the gradients go through DDP's all-reduce
        F.cross_entropy(plain(images), labels).backward()
        _sync()
        for (name, param), other in zip(model.named_parameters(), plain.parameters()):
            assert (param.grad is None) == (other.grad is None), name
            if param.grad is not None:
                # One rank: the all-reduce averages a single copy; only kernel-choice round-off could differ.
                torch.testing.assert_close(param.grad, other.grad, rtol=1e-5, atol=1e-7,
                                           msg=lambda text: f"{name}: {text}")
        assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in model.parameters())
        values = torch.arange(1.0, 5.0, device=GPU)
        dist.all_reduce(values)  # a sum over one rank
        _sync()
        assert torch.equal(values.cpu(), torch.arange(1.0, 5.0))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- 7. pinned loader memory ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".jpg"])  # JPEGs come out of the workers as channels-last batches
def test_pinned_batches_reach_the_gpu_without_blocking_unchanged(tmp_path, suffix):
    write_image_folder(tmp_path / "images", {"ant": 5, "bee": 4}, size=40, seed=3, suffix=suffix)
    samples, _ = list_image_folder(tmp_path / "images")
    dataset = ImageFolderDataset(samples, eval_transform(32))

    def sampler():
        return ShardSampler(len(samples), shuffle=False, pad=False)

    # Independent truth: the same batches read in this process into ordinary memory.
    expected = list(build_loader(dataset, sampler(), 4, 0, drop_last=False, pin_memory=False))
    # pin_memory=True without CUDA only warns that nothing can be pinned: ask for it where it means something.
    loader = build_loader(dataset, sampler(), 4, 2, drop_last=False, pin_memory=ON_CUDA)
    assert loader.pin_memory == ON_CUDA and loader.num_workers == 2
    copies = []
    for images, labels, indices, failed in loader:
        if ON_CUDA:
            assert images.is_pinned() and labels.is_pinned()
        copies.append((images.to(GPU, non_blocking=True), labels.to(GPU, non_blocking=True), indices, failed))
    _sync()  # the copies were queued without waiting: only now are they done
    assert len(copies) == len(expected) == 3
    for (images, labels, indices, failed), (cpu_images, cpu_labels, cpu_indices, cpu_failed) in zip(copies, expected):
        assert images.device == GPU and images.dtype == torch.uint8 and images.shape == cpu_images.shape
        assert torch.equal(images.cpu(), cpu_images) and torch.equal(labels.cpu(), cpu_labels)
        assert torch.equal(indices, cpu_indices) and failed == cpu_failed == 0


# ---- 8. train.precision=auto ----------------------------------------------------------------------------------------
def test_auto_precision_is_bf16_on_the_gpu_and_fp32_on_the_cpu(data, tmp_path):
    if ON_CUDA:  # bf16 tensor cores came with compute capability 8.0 (Ampere); the H200 is 9.0
        expected = "bf16" if torch.cuda.get_device_capability(GPU) >= (8, 0) else "fp16"
    else:
        expected = "fp32"
    assert resolve_precision("auto", GPU) == expected
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp16", GPU) == "fp16"  # anything but auto is kept
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for run, (device, wanted) in enumerate(((GPU, expected), (CPU, "fp32"))):
        trainer = Trainer(tiny_config(data, tmp_path / f"run{run}", f"--train.device={device}", *NO_RANDOMNESS))
        assert trainer.cfg.train.precision == "auto" and trainer.precision == wanted
        assert trainer.scaler.is_enabled() == (wanted == "fp16")
        seen = []
        hook = trainer.model.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        images, labels, _, _ = next(iter(trainer.train_loader))
        try:
            loss = trainer._train_step(images, labels)
        finally:
            hook.remove()
        assert seen == [dtypes[wanted]] and math.isfinite(float(loss))  # the step's forward ran in that precision
        with torch.no_grad(), autocast_context(trainer.precision, trainer.device):
            logits = trainer.model(normalize_batch(images.to(trainer.device)))
        assert logits.dtype == dtypes[wanted]
