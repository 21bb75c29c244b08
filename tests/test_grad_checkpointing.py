"""Activation checkpointing per block (model.grad_checkpointing): the gradients of plain autograd, dropout and
stochastic depth included (the recomputation replays the forward's RNG state), with each block run again in the
backward pass."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from vitkit.engine.trainer import Trainer, train
from vitkit.model.vit import create_model


def tiny_model(**overrides):
    # The original's regularisation: dropout 0.1 everywhere and stochastic depth, so that RNG replay matters.
    return create_model("vit_tiny_patch16", patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_dim=64,
                        image_size=32, num_classes=5, drop_rate=0.1, proj_drop_rate=0.1, mlp_drop_rate=0.1,
                        attn_drop_rate=0.1, drop_path_rate=0.2, **overrides)


def loss_and_gradients(model, images, labels, checkpointing: bool):
    model.grad_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("pool", ["token", "mean"])
def test_the_gradients_are_those_of_autograd_without_checkpointing(pool):
    torch.manual_seed(0)
    model = tiny_model(pool=pool).train()
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    plain_loss, plain = loss_and_gradients(model, images, labels, checkpointing=False)
    loss, checkpointed = loss_and_gradients(model, images, labels, checkpointing=True)
    assert torch.equal(loss, plain_loss)
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, rtol=1e-6, atol=1e-9), name
    # Another seed draws other dropout masks, and other gradients: the comparison above is not vacuous.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(8)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    assert not torch.allclose(model.head.weight.grad, plain["head.weight"])


def test_each_block_runs_again_in_the_backward_pass_and_only_while_training():
    model = tiny_model().train()
    calls = []
    for index, block in enumerate(model.blocks):
        # A pre-hook: the recomputation stops as soon as it has what the backward needs (torch's early stop), so a
        # block's forward may not return the second time.
        block.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    images = torch.randn(2, 3, 32, 32)
    model.grad_checkpointing = True
    loss = model(images).sum()
    assert calls == [0, 1, 2]
    loss.backward()
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]
    calls.clear()
    with torch.no_grad():
        model(images)
    assert calls == [0, 1, 2]  # inference keeps nothing for a backward pass, so there is nothing to recompute


def test_a_training_run_with_checkpointing_ends_with_the_same_weights(tiny_dataset, tmp_path):
    extra = ("--max_epoch=1", "--mixup=0.2")  # dropout and stochastic depth on, as tiny_config has them
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "probe", "--model.grad_checkpointing=true", *extra))
    assert trainer.model.grad_checkpointing
    train(tiny_config(tiny_dataset, tmp_path / "plain", *extra))
    train(tiny_config(tiny_dataset, tmp_path / "checkpointed", "--model.grad_checkpointing=true", *extra))
    plain = load_file(tmp_path / "plain" / "vit_tiny_patch16-1_4.safetensors")
    checkpointed = load_file(tmp_path / "checkpointed" / "vit_tiny_patch16-1_4.safetensors")
    for name, value in plain.items():
        assert torch.allclose(checkpointed[name], value, rtol=1e-5, atol=1e-6), name
