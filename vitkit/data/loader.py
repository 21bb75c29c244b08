"""Sample order across ranks and epochs, batching that drops unreadable images, and the DataLoader around them."""
from __future__ import annotations

import os

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from vitkit.errors import VitkitError


def derive_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from non-negative integers, e.g. (seed, epoch) or (seed, epoch, index).

    numpy's SeedSequence hashes the parts, so nearby tuples such as (0, 1) and (1, 0) give unrelated streams,
    which `seed + epoch` would not.
    """
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(1, np.uint64)[0])


_MASK64 = (1 << 64) - 1
# Copies of each image per epoch under repeated augmentation (data.repeated_aug): DeiT uses 3, and past a few an
# epoch sees too few distinct images to be of use.
MAX_REPEATED_AUG = 16


def sample_seed(epoch_key: int, index: int) -> int:
    """The seed of sample `index`: the index-th output of SplitMix64 started at epoch_key (a derive_seed(seed,
    epoch)), whose mixing gives neighbouring indices unrelated seeds. Same quality as derive_seed(seed, epoch, index)
    for a twentieth of its cost, which matters once per decoded image."""
    mixed = (epoch_key + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _MASK64
    return mixed ^ (mixed >> 31)


def split_sample_key(key: int, num_samples: int) -> tuple[int, int]:
    """(dataset index, copy) of a key ShardSampler yields: copy c of sample i under repeated augmentation is the
    key i + c * num_samples, and a key below num_samples is the index itself (copy 0)."""
    return key % num_samples, key // num_samples


def check_seed(seed: int) -> int:
    """The seed as an int; negative seeds are refused because they cannot be hashed into a stream."""
    if int(seed) < 0:
        raise VitkitError(f"the data seed must be 0 or more, got {seed}; set seed to a non-negative integer")
    return int(seed)


class ShardSampler(Sampler[int]):
    """The sample keys one rank reads in one epoch; the same on every rank for an epoch, new for each epoch.

    Each epoch permutes range(num_samples) with a generator seeded from (seed, epoch) (identity order when
    `shuffle` is False) and rank r takes positions r, r + world_size, ... With `pad` (training) the permutation is
    first extended by repeating its start so every rank gets ceil(num_samples / world_size) indices, as
    DistributedSampler and the original's sharding do. Without it (evaluation) every sample is read exactly once
    across the ranks and rank lengths differ by at most one.

    Repeated augmentation (`repeats` k > 1, training only; DeiT's RASampler, timm's RepeatAugSampler): every entry of
    the permutation is written k times in a row before the ranks take their positions, so with k <= world_size the
    k copies of an image land on k different ranks (with one process, k neighbours of one batch). The epoch keeps
    its length, ceil(num_samples / world_size) per rank, so it covers about num_samples / k distinct images, each
    k times (timm's default also rounds that down to a multiple of 256 samples; here the epoch is exactly as long as
    without repeats, so steps per epoch and the schedule do not depend on k). Copy c of sample i is yielded as the
    key i + c * num_samples (`split_sample_key`): the dataset reads sample i and seeds its augmentation from the
    key, so each copy is augmented differently. Copy 0 is the index itself, and with k = 1 the order is exactly
    the plain one.

    `set_epoch(e)` selects epoch e from its start; `skip(n)` then drops this rank's first n keys of that epoch,
    so a run resumed after n samples continues with exactly the next one. len() counts what is left.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        pad: bool = True,
        repeats: int = 1,
    ):
        if num_samples < 1:
            raise VitkitError("the dataset is empty (0 samples); point the data path at a folder with images")
        if world_size < 1 or not 0 <= rank < world_size:
            raise VitkitError(f"rank {rank} does not fit world size {world_size}; launch with torchrun")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATED_AUG:
            raise VitkitError(
                f"data.repeated_aug must be a whole number from 1 (off) to {MAX_REPEATED_AUG}, got {repeats!r}"
            )
        if repeats > 1 and not pad:
            raise VitkitError("repeated augmentation is for training; evaluation reads every sample once: "
                              "leave data.repeated_aug at 1 there")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = check_seed(seed)
        self.pad = pad
        self.repeats = repeats
        self.epoch = 0
        self.start = 0

    @property
    def samples_per_epoch(self) -> int:
        """This rank's number of indices in a whole epoch, whatever was skipped."""
        if self.pad:
            return -(-self.num_samples // self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start = 0

    def skip(self, num_consumed: int) -> None:
        if not 0 <= num_consumed <= self.samples_per_epoch:
            raise VitkitError(
                f"cannot skip {num_consumed} samples of an epoch of {self.samples_per_epoch} on this rank; "
                "resume from a checkpoint written with the same data and world size"
            )
        self.start = int(num_consumed)

    def epoch_indices(self) -> list[int]:
        """This rank's whole epoch of sample keys, before skipping."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        # Positions in the permutation with each entry written `repeats` times, which pad wraps around to its start
        # (tiny datasets on many ranks); only this rank's positions are computed, never the repeated list itself.
        span = self.samples_per_epoch * self.world_size if self.pad else self.num_samples
        positions = torch.arange(self.rank, span, self.world_size) % (self.num_samples * self.repeats)
        copies = positions % self.repeats
        return (order[positions // self.repeats] + copies * self.num_samples).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start:])

    def __len__(self) -> int:
        return self.samples_per_epoch - self.start


def _is_channels_last(image: torch.Tensor) -> bool:
    """Whether a (C, H, W) image's channels are its innermost dimension, C > 1."""
    return image.dim() == 3 and image.shape[0] > 1 and image.stride(0) == 1 and image.stride(2) == image.shape[0]


def collate_skipping_failures(
    batch: Sequence[tuple[torch.Tensor | None, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stacks (image, label, index) samples into (images uint8 (B,3,H,W), labels int64, indices int64, failed).

    Samples whose image is None (the dataset could not read them and warned) are left out and counted in `failed`.
    A batch where every image failed gives B = 0 with images of shape (0, 3, 0, 0); the caller skips it. When any
    image is channels-last, the batch is: (B, 3, H, W) over (B, H, W, 3) memory.
    """
    kept = [sample for sample in batch if sample[0] is not None]
    failed = len(batch) - len(kept)
    if not kept:
        empty = torch.empty(0, dtype=torch.int64)
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), empty, empty.clone(), failed
    # default_collate stacks straight into shared memory inside a worker, where the batch must go to reach the main
    # process; torch.stack into private memory would be copied there once more on sending.
    if any(_is_channels_last(image) for image, _, _ in kept):
        # The JPEG paths give (3, H, W) views of (H, W, 3) memory. Stacking them as they lie is a plain copy; stacking
        # them into planar memory would transpose every image, a strided copy far slower than a plain one (only the
        # odd planar one, from a PNG or a fallback decode, is transposed here). The device makes the batch planar
        # while normalizing it (normalize_batch), where it costs next to nothing.
        images = default_collate([image.permute(1, 2, 0) for image, _, _ in kept]).permute(0, 3, 1, 2)
    else:
        images = default_collate([image for image, _, _ in kept])
    labels = torch.tensor([label for _, label, _ in kept], dtype=torch.int64)
    indices = torch.tensor([index for _, _, index in kept], dtype=torch.int64)
    return images, labels, indices, failed


class EpochDataLoader(DataLoader):
    """A DataLoader whose set_epoch reaches both the sampler (order) and the dataset (augmentation seeds)."""

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch; persistent workers see the dataset's epoch through shared memory."""
        for part in (self.sampler, self.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)


def usable_workers(wanted: int, processes_per_machine: int = 1) -> int:
    """At most one loader worker per CPU core this process may use: the original's 14 and 12 workers assume a
    192-core host, and more workers than cores only thrash."""
    cores = max(1, len(os.sched_getaffinity(0)) // max(1, processes_per_machine))
    return min(wanted, cores)


def build_loader(
    dataset: Dataset,
    sampler: Sampler[int],
    batch_size: int,
    num_workers: int,
    drop_last: bool,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int = 2,
    collate_fn=None,
    worker_init_fn=None,
) -> EpochDataLoader:
    """Batches of `collate_skipping_failures` in the sampler's order.

    drop_last=True is for training (the original drops the remainder there); evaluation keeps every sample.
    pin_memory defaults to whether CUDA is available, persistent_workers to whether there are workers, so the
    workers (and their decoders) survive between epochs. `collate_fn` replaces `collate_skipping_failures`;
`worker_init_fn` runs first in each worker.
    """
    if batch_size < 1:
        raise VitkitError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise VitkitError(f"num_workers must be 0 (read in the main process) or more, got {num_workers}")
    with_workers = num_workers > 0
    return EpochDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or collate_skipping_failures,
        worker_init_fn=worker_init_fn,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=with_workers if persistent_workers is None else persistent_workers and with_workers,
        prefetch_factor=prefetch_factor if with_workers else None,
        # Its own generator: each iteration draws a worker base seed, which would otherwise come from (and shift)
        # the main process's stream that dropout uses. Augmentation does not depend on it (the dataset seeds
        # every sample), so a fixed seed is enough.
        generator=torch.Generator().manual_seed(0),
    )
