"""Sharding, resuming, failure-tolerant batching and augmentation that depends only on (seed, epoch, index)."""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.folder import ImageFolderDataset, list_image_folder
from vitkit.data.loader import ShardSampler, build_loader, collate_skipping_failures, sample_seed
from vitkit.data.transforms import train_transform
from vitkit.errors import VitkitError


def rank_orders(num_samples, world_size, **options):
    samplers = [ShardSampler(num_samples, rank, world_size, **options) for rank in range(world_size)]
    return [list(sampler) for sampler in samplers]


@pytest.fixture
def image_folder(tmp_path):
    """Nine small random images in three classes, of a few different sizes."""
    rng = np.random.default_rng(0)
    for i in range(9):
        height, width = 30 + 4 * i, 50 - 2 * i
        path = tmp_path / f"class{i % 3}" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return tmp_path


def augmented_dataset(root, seed=7):
    samples, _ = list_image_folder(root)
    return ImageFolderDataset(samples, train_transform(24, augment="autoaugment", random_erasing=0.5), seed=seed)


def images_by_index(loader):
    outputs = {}
    for images, _, indices, failed in loader:
        assert failed == 0
        for image, index in zip(images, indices.tolist()):
            outputs[index] = image
    return outputs


@pytest.mark.parametrize("shuffle", [True, False])
def test_eval_sharding_reads_every_sample_exactly_once(shuffle):
    orders = rank_orders(11, 2, shuffle=shuffle, pad=False)
    assert [len(order) for order in orders] == [6, 5]
    assert sorted(orders[0] + orders[1]) == list(range(11))
    if not shuffle:
        assert orders == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]


def test_train_sharding_pads_ranks_to_equal_length():
    orders = rank_orders(11, 2, pad=True)
    assert [len(order) for order in orders] == [6, 6]
    assert set(orders[0] + orders[1]) == set(range(11))
    # More ranks than samples: the permutation repeats until every rank has one.
    tiny = rank_orders(3, 4, pad=True)
    assert [len(order) for order in tiny] == [1, 1, 1, 1]
    assert set(sum(tiny, [])) == {0, 1, 2}


def test_ranks_share_one_permutation_per_epoch_and_epochs_differ():
    def epoch_order(epoch, world_size):
        samplers = [ShardSampler(12, rank, world_size, seed=3) for rank in range(world_size)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        orders = [list(sampler) for sampler in samplers]
        return [orders[position % world_size][position // world_size] for position in range(12)]

    # The ranks' interleaved shares rebuild the single-process permutation: one permutation, split.
    assert epoch_order(0, 3) == epoch_order(0, 1)
    assert sorted(epoch_order(0, 1)) == list(range(12))
    assert epoch_order(1, 3) == epoch_order(1, 1)
    assert epoch_order(0, 1) != epoch_order(1, 1)
    assert epoch_order(0, 1) == epoch_order(0, 1)
    other_seed = ShardSampler(12, seed=4)
    assert list(other_seed) != epoch_order(0, 1)


def test_skip_resumes_at_the_exact_next_sample():
    sampler = ShardSampler(23, rank=1, world_size=2, seed=5)
    sampler.set_epoch(4)
    full = list(sampler)
    resumed = ShardSampler(23, rank=1, world_size=2, seed=5)
    resumed.set_epoch(4)
    resumed.skip(7)
    assert list(resumed) == full[7:]
    assert len(resumed) == len(full) - 7 and resumed.samples_per_epoch == len(full)
    resumed.set_epoch(5)  # a new epoch starts from its beginning
    assert len(resumed) == len(full)
    with pytest.raises(VitkitError, match="cannot skip"):
        resumed.skip(len(full) + 1)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(VitkitError, match="rank 2"):
        ShardSampler(10, rank=2, world_size=2)
    with pytest.raises(VitkitError, match="empty"):
        ShardSampler(0)
    with pytest.raises(VitkitError, match="seed"):
        ShardSampler(10, seed=-1)


def test_collate_of_only_failures_is_an_empty_batch():
    images, labels, indices, failed = collate_skipping_failures([(None, 1, 0), (None, 2, 5)])
    assert images.shape == (0, 3, 0, 0) and images.dtype == torch.uint8
    assert labels.shape == indices.shape == (0,)
    assert failed == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_survives_corrupt_images(image_folder, num_workers):
    (image_folder / "class1" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (image_folder / "class2" / "cut.png").write_bytes((image_folder / "class2" / "2.png").read_bytes()[:200])
    samples, _ = list_image_folder(image_folder)
    dataset = ImageFolderDataset(samples, train_transform(16, augment="none"))
    sampler = ShardSampler(len(dataset), shuffle=False, pad=False)
    loader = build_loader(dataset, sampler, batch_size=4, num_workers=num_workers, drop_last=False)
    seen, failures = [], 0
    # Worker processes warn on their own stderr, out of pytest's reach.
    with pytest.warns(UserWarning) if num_workers == 0 else contextlib.nullcontext():
        for images, labels, indices, failed in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
            assert labels.tolist() == [int(dataset.labels[i]) for i in indices.tolist()]
            seen += indices.tolist()
            failures += failed
    assert failures == 2
    bad = {i for i in range(len(dataset)) if dataset.path(i).endswith(("broken.jpg", "cut.png"))}
    assert sorted(seen) == sorted(set(range(len(dataset))) - bad)


def test_augmentation_depends_only_on_seed_epoch_and_index(image_folder):
    dataset = augmented_dataset(image_folder)
    in_process = build_loader(dataset, ShardSampler(len(dataset), seed=1), batch_size=4, num_workers=0, drop_last=False)
    reference = images_by_index(in_process)
    assert len(reference) == 9

    # Other order, batch size and worker count: the same image for every index.
    shuffled = build_loader(dataset, ShardSampler(len(dataset), seed=99), batch_size=2, num_workers=2, drop_last=False)
    shuffled.set_epoch(0)
    in_workers = images_by_index(shuffled)
    assert all(torch.equal(in_workers[i], reference[i]) for i in range(9))

    # The next epoch reaches the persistent workers and changes the augmentation.
    assert shuffled.persistent_workers
    shuffled.set_epoch(1)
    next_epoch = images_by_index(shuffled)
    assert sum(torch.equal(next_epoch[i], reference[i]) for i in range(9)) <= 1
    in_process.set_epoch(1)
    assert all(torch.equal(image, images_by_index(in_process)[i]) for i, image in next_epoch.items())

    # A different dataset seed, a different augmentation.
    other = augmented_dataset(image_folder, seed=8)
    assert sum(torch.equal(other[i][0], reference[i]) for i in range(9)) <= 1


def test_reading_in_the_main_process_leaves_its_random_stream_alone(image_folder):
    dataset = augmented_dataset(image_folder)
    loader = build_loader(dataset, ShardSampler(len(dataset)), batch_size=4, num_workers=0, drop_last=True)
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    dataset[3]
    list(loader)
    assert torch.equal(torch.rand(5), expected)


def test_resumed_loader_gives_the_rest_of_the_epoch(image_folder):
    dataset = augmented_dataset(image_folder)
    sampler = ShardSampler(len(dataset), seed=2)
    loader = build_loader(dataset, sampler, batch_size=2, num_workers=0, drop_last=True)
    loader.set_epoch(3)
    full = list(loader)
    assert len(full) == len(loader) == 4  # 9 samples, batches of 2, remainder dropped
    loader.set_epoch(3)
    sampler.skip(2 * 2)  # two batches were done before the interruption
    rest = list(loader)
    assert len(rest) == len(loader) == 2
    for (images, labels, indices, _), (images_full, labels_full, indices_full, _) in zip(rest, full[2:]):
        assert torch.equal(indices, indices_full) and torch.equal(labels, labels_full)
        assert torch.equal(images, images_full)


def test_build_loader_defaults():
    dataset = ImageFolderDataset([], transform=None)
    loader = build_loader(dataset, ShardSampler(4), batch_size=2, num_workers=0, drop_last=True)
    assert loader.pin_memory == torch.cuda.is_available()
    assert not loader.persistent_workers
    with pytest.raises(VitkitError, match="batch_size"):
        build_loader(dataset, ShardSampler(4), batch_size=0, num_workers=0, drop_last=True)
    with pytest.raises(VitkitError, match="num_workers"):
        build_loader(dataset, ShardSampler(4), batch_size=2, num_workers=-1, drop_last=True)


def test_sample_seeds_are_splitmix64s_outputs():
    # The first outputs of SplitMix64 seeded with 0, as its reference C implementation (Vigna) prints them.
    assert [sample_seed(0, index) for index in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    # torch keeps the low 32 bits of a seed: those too differ between neighbouring samples and epochs.
    low_bits = {sample_seed(key, index) & 0xFFFFFFFF for key in (0, 1) for index in range(2_000)}
    assert len(low_bits) == 4_000


def test_channels_last_images_make_a_channels_last_batch_with_the_same_pixels():
    planar = [torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8) for _ in range(3)]
    channels_last = [image.permute(1, 2, 0).contiguous().permute(2, 0, 1) for image in planar]
    # A crop of a larger channels-last image, as eval's centre crop leaves it: rows further apart than its width.
    wider = torch.randint(0, 256, (9, 11, 3), dtype=torch.uint8)
    planar.append(wider.permute(2, 0, 1)[:, 2:7, 3:10].contiguous())
    channels_last.append(wider.permute(2, 0, 1)[:, 2:7, 3:10])
    batch = [(image, index, index) for index, image in enumerate(channels_last)] + [(None, 9, 9)]
    images, labels, indices, failed = collate_skipping_failures(batch)
    assert failed == 1 and labels.tolist() == indices.tolist() == [0, 1, 2, 3]
    assert torch.equal(images, torch.stack(planar)) and images.shape == (4, 3, 5, 7)
    assert images.permute(0, 2, 3, 1).is_contiguous()  # (B, H, W, 3) in memory
    # One planar image among them (a PNG, a fallback decode): still one channels-last batch, the same pixels.
    mixed, _, _, _ = collate_skipping_failures([(channels_last[0], 0, 0), (planar[1], 1, 1)])
    assert mixed.permute(0, 2, 3, 1).is_contiguous() and torch.equal(mixed, torch.stack(planar[:2]))
    only_planar, _, _, _ = collate_skipping_failures([(image, 0, 0) for image in planar])
    assert only_planar.is_contiguous() and torch.equal(only_planar, torch.stack(planar))
    grey = [torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8) for _ in range(2)]
    assert collate_skipping_failures([(image, 0, 0) for image in grey])[0].is_contiguous()
