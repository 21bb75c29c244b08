"""Repeated augmentation (DeiT's RASampler): copies on different ranks, exact under DDP and resume, each copy its own
augmentation. timm's RepeatAugSampler is the oracle for the order."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data.distributed_sampler import RepeatAugSampler

from conftest import tiny_config, whole_and_resumed_runs
from vitkit.config import load_config
from vitkit.data.folder import ImageFolderDataset, list_image_folder
from vitkit.data.loader import ShardSampler, build_loader, split_sample_key
from vitkit.data.transforms import train_transform
from vitkit.engine.trainer import Trainer
from vitkit.errors import VitkitError


def rank_keys(num_samples, world_size, epoch=0, **options):
    samplers = [ShardSampler(num_samples, rank, world_size, **options) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


def test_a_hand_computed_epoch_of_four_images_two_ranks_two_copies():
    # Without shuffling the doubled order is 0 0 1 1 2 2 3 3; an epoch is ceil(4 / 2) = 2 positions a rank, rank 0
    # taking positions 0 and 2, rank 1 positions 1 and 3. Copy 1 of image i is the key i + 4.
    assert rank_keys(4, 2, shuffle=False, repeats=2) == [[0, 1], [4, 5]]


@pytest.mark.parametrize("num_samples, world_size, repeats", [(12, 3, 3), (10, 3, 3), (7, 2, 3), (5, 4, 2), (9, 1, 3),
                                                             (300, 8, 3), (2, 5, 3), (3, 8, 2)])
def test_images_per_rank_match_timms_repeat_aug_sampler(num_samples, world_size, repeats):
    # timm's sampler (selected_round=0: an epoch of ceil(N / world) per rank, as here) reads range(N) unshuffled.
    for rank, keys in enumerate(rank_keys(num_samples, world_size, shuffle=False, repeats=repeats)):
        oracle = RepeatAugSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=False,
                                  num_repeats=repeats, selected_round=0)
        assert [split_sample_key(key, num_samples)[0] for key in keys] == list(oracle)


def test_world_three_repeats_three_puts_the_copies_of_each_image_on_three_ranks():
    num_samples = 30
    orders = rank_keys(num_samples, 3, epoch=4, seed=11, repeats=3)
    assert [len(order) for order in orders] == [10, 10, 10]  # the epoch keeps its length: N / world per rank
    ranks_of_image = {}
    copies = Counter()
    for rank, order in enumerate(orders):
        for key in order:
            image, copy = split_sample_key(key, num_samples)
            ranks_of_image.setdefault(image, []).append(rank)
            copies[(image, copy)] += 1
    # A third of the images, each read three times: once on every rank, as three different copies.
    assert len(ranks_of_image) == num_samples // 3
    assert all(sorted(ranks) == [0, 1, 2] for ranks in ranks_of_image.values())
    assert set(copies.values()) == {1}
    assert {copy for _, copy in copies} == {0, 1, 2}
    # The images are the start of the plain (repeats 1) permutation of this seed and epoch, in its order.
    plain = rank_keys(num_samples, 1, epoch=4, seed=11)[0]
    interleaved = [orders[position % 3][position // 3] for position in range(num_samples)]
    assert [split_sample_key(key, num_samples)[0] for key in interleaved] == [i for i in plain[:10] for _ in range(3)]


def test_one_process_reads_the_copies_next_to_each_other():
    keys = rank_keys(9, 1, seed=2, repeats=3)[0]
    images = [split_sample_key(key, 9)[0] for key in keys]
    assert images[0::3] == images[1::3] == images[2::3]
    assert [split_sample_key(key, 9)[1] for key in keys] == [0, 1, 2] * 3


def test_repeats_one_is_the_plain_order_and_the_epoch_length_never_changes():
    for world_size in (1, 2, 3):
        assert rank_keys(11, world_size, seed=5, repeats=1) == rank_keys(11, world_size, seed=5)
        plain = [len(order) for order in rank_keys(11, world_size, seed=5)]
        assert [len(order) for order in rank_keys(11, world_size, seed=5, repeats=3)] == plain


def test_each_ranks_share_is_a_function_of_seed_epoch_and_rank():
    first = rank_keys(24, 3, epoch=2, seed=9, repeats=3)
    assert rank_keys(24, 3, epoch=2, seed=9, repeats=3) == first
    assert rank_keys(24, 3, epoch=3, seed=9, repeats=3) != first
    assert rank_keys(24, 3, epoch=2, seed=10, repeats=3) != first
    # One sampler stepping through epochs gives what a fresh one set to that epoch gives.
    sampler = ShardSampler(24, 1, 3, seed=9, repeats=3)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        assert list(sampler) == rank_keys(24, 3, epoch=epoch, seed=9, repeats=3)[1]


@pytest.mark.parametrize("consumed", [0, 1, 4, 7, 8])
def test_a_resumed_rank_continues_with_the_tail_of_the_uninterrupted_order(consumed):
    for rank in range(3):
        whole = rank_keys(24, 3, epoch=5, seed=3, repeats=3)[rank]
        resumed = ShardSampler(24, rank, 3, seed=3, repeats=3)  # a new process, as after a restart
        resumed.set_epoch(5)
        resumed.skip(consumed)
        assert list(resumed) == whole[consumed:]
        assert len(resumed) == len(whole) - consumed


@pytest.mark.parametrize("repeats", [0, -1, 17, True, 1.5, "3"])
def test_bad_repeat_counts_are_refused(repeats):
    with pytest.raises(VitkitError, match="repeated_aug"):
        ShardSampler(10, repeats=repeats)


def test_evaluation_refuses_repeats():
    with pytest.raises(VitkitError, match="evaluation reads every sample once"):
        ShardSampler(10, pad=False, repeats=3)


@pytest.mark.parametrize("value, fragment", [("0", "must be >= 1"), ("17", "must be <= 16"), ("three", "integer")])
def test_config_bounds_repeated_aug(value, fragment):
    assert load_config(None, ["--data.repeated_aug=3"]).data.repeated_aug == 3
    assert load_config(None, []).data.repeated_aug == 1
    with pytest.raises(VitkitError, match=fragment):
        load_config(None, [f"--data.repeated_aug={value}"])


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        path = tmp_path / f"class{i % 2}" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(path)
    return tmp_path


def test_each_copy_gets_its_own_augmentation_and_is_reproducible_elsewhere(image_folder):
    samples, _ = list_image_folder(image_folder)
    dataset = ImageFolderDataset(samples, train_transform(24, augment="three_augment"), seed=4)
    dataset.set_epoch(1)
    fresh = ImageFolderDataset(samples, train_transform(24, augment="three_augment"), seed=4)
    fresh.set_epoch(1)
    count = len(dataset)
    for index in range(count):
        copies = [dataset[index + copy * count] for copy in range(3)]
        assert [(label, returned) for _, label, returned in copies] == [(int(dataset.labels[index]), index)] * 3
        images = [image for image, _, _ in copies]
        assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
        assert not torch.equal(images[0], images[2])
        # Each copy is a function of (seed, epoch, key) alone: another process's dataset (a loader worker, a resumed
        # run) draws the same pixels for it.
        assert torch.equal(fresh[index][0], images[0]) and torch.equal(fresh[index + 2 * count][0], images[2])


def test_the_loader_reads_real_indices_and_every_copy_of_an_image(image_folder):
    samples, _ = list_image_folder(image_folder)
    dataset = ImageFolderDataset(samples, train_transform(24, augment="randaugment"), seed=4)
    sampler = ShardSampler(len(dataset), seed=4, repeats=3)
    loader = build_loader(dataset, sampler, batch_size=3, num_workers=0, drop_last=True)
    loader.set_epoch(2)
    batches = list(loader)
    assert len(batches) == 2
    for images, labels, indices, failed in batches:
        # One batch holds the three copies of one image: the same index and label, three different crops.
        assert failed == 0 and len(set(indices.tolist())) == 1 and len(set(labels.tolist())) == 1
        assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


def test_training_with_repeated_aug_resumed_mid_epoch_ends_with_the_same_weights(tiny_dataset, tmp_path, monkeypatch):
    extra = ("--max_epoch=2", "--checkpoint.save_checkpoint_steps=2", "--data.repeated_aug=3",
             "--data.augment=three_augment", "--keep_checkpoint_max=10")
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "probe", *extra))
    assert trainer.train_sampler.repeats == 3 and trainer.steps_per_epoch == 36 // 8
    # Killed after the step-6 checkpoint, in epoch 1.
    whole_and_resumed_runs(tiny_dataset, tmp_path, monkeypatch, extra, die_at_call=7)

    whole = load_file(tmp_path / "whole" / "vit_tiny_patch16-2_4.safetensors")
    resumed = load_file(tmp_path / "killed" / "vit_tiny_patch16-2_4.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
