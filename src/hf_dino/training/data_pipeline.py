"""Feeding multi-crop batches to the loop, deterministically enough to resume a run exactly.

For a map-style dataset (the embedded Fashion-MNIST subset, a local image folder, parquet files read
into memory) the loop owns the order: epoch `e` visits the images in a permutation drawn from
`(seed, e)`, and optimizer step `s` of that epoch takes the slice `[s * G, (s + 1) * G)` of it, where
`G = batch_size x processes x accumulation steps`. Process `r` takes micro-batch `a`'s sub-slice
`(a * processes + r) * batch_size`. So

- every image is seen once per epoch, whatever the number of processes or data workers;
- a run on 2 processes sees exactly the images of a 1-process run with twice the batch, and 2 x half
  batches with accumulation see exactly the images of one full batch;
- resuming at step `s` needs only `s`: no iterator state, no skipped decoding.

Each image's random crops are drawn from a generator seeded by `(seed, epoch, index)`, so the views do not
depend on which worker made them or on whether the run was interrupted.

Streamed datasets (a Hub id, webdataset shards) cannot be indexed; they go through
`hf_dino.data.MultiCropDataset`, which shards the stream over processes and workers and keeps its own
resumable position.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

# One item: the crops of one image, [global 1, global 2, local 1, ...], each (C, H, W).
Crops = list[torch.Tensor]


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the random views of image `index` (>= -1) in `epoch` of a run seeded `seed`."""
    entropy = [seed % (1 << 64), epoch, index + 1]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class SeededViews:
    """Call an augmentation with every random generator it might use seeded by `(seed, epoch, index)`.

    torchvision and PIL-based transforms draw from torch's, Python's and numpy's global generators; their
    states are saved and restored around the call so that the training process's own random stream (drop
    path, ...) is unaffected when data loads in the main process.

    Args:
        augmentation: image -> crops (list of `(C, H, W)` tensors).
        seed: the run's seed.
    """

    def __init__(self, augmentation: Callable[[Any], Crops], seed: int) -> None:
        self.augmentation = augmentation
        self.seed = seed

    def __call__(self, image: Any, epoch: int, index: int) -> Crops:
        seed = example_seed(self.seed, epoch, index)
        python_state = random.getstate()
        numpy_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            try:
                return list(self.augmentation(image))
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class AugmentedImages(Dataset):
    """A map-style image dataset whose items are the multi-crop views of one image.

    Items are addressed by `(epoch, index)` (see `StepBatchSampler`), so that the views of an image are
    a function of the seed, the epoch and the index alone.

    Args:
        dataset: a `datasets.Dataset` or any sequence of rows (dicts) or images.
        views: a `SeededViews` (image, epoch, index) -> crops.
        image_column: the column holding images when rows are dicts.
        decode: turns a row's image value into what the augmentation takes (e.g. a PIL image); None keeps it.
    """

    def __init__(
        self,
        dataset: Any,
        views: Callable[[Any, int, int], Crops],
        image_column: str | None = None,
        decode: Callable[[Any], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.views = views
        self.image_column = image_column
        self.decode = decode

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Crops | None:
        epoch, index = key
        row = self.dataset[int(index)]
        image = row[self.image_column] if self.image_column is not None and isinstance(row, dict) else row
        if self.decode is not None:
            image = self.decode(image)
            if image is None:  # a corrupt or non-image entry: dropped from its batch by the collation
                return None
        return self.views(image, epoch, index)


class PrecomputedCrops(Dataset):
    """Crops already made (tests, ablations on fixed views): item `(epoch, index)` is `index`'s crops.

    Args:
        crops: one tensor per crop position, `(num_images, C, H, W)` each, in the order
            [global 1, global 2, local 1, ...].
    """

    def __init__(self, crops: Sequence[torch.Tensor]) -> None:
        if len(crops) < 2:
            raise ValueError("DINO needs at least the 2 global crops")
        sizes = {len(crop) for crop in crops}
        if len(sizes) != 1:
            raise ValueError(f"every crop position needs the same number of images, got {sorted(sizes)}")
        self.crops = [crop.contiguous() for crop in crops]

    def __len__(self) -> int:
        return len(self.crops[0])

    def __getitem__(self, key: tuple[int, int]) -> Crops:
        _, index = key
        return [crop[int(index)] for crop in self.crops]


def collate_crops(items: list[Crops | None]) -> Crops | None:
    """A list of per-image crop lists -> one batch tensor per crop position, `(B, C, H, W)` each.

    Skipped images (None) are dropped; a batch of only skipped images gives None.
    """
    items = [item for item in items if item is not None]
    if not items:
        return None
    return [torch.stack([item[position] for item in items]) for position in range(len(items[0]))]


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this process's micro-batches, as `(epoch, index)` keys, from `start_step` to `total_steps`.

    Args:
        num_examples: images in the dataset.
        batch_size: images per process per micro-batch.
        accumulation_steps: micro-batches per optimizer step.
        process_index / num_processes: this process and how many there are.
        seed: the run's seed (the epoch permutations derive from it).
        start_step / total_steps: optimizer steps to cover.
        shuffle: permute each epoch (False keeps the dataset order, for tests).
    """

    def __init__(
        self,
        *,
        num_examples: int,
        batch_size: int,
        accumulation_steps: int,
        process_index: int,
        num_processes: int,
        seed: int,
        start_step: int,
        total_steps: int,
        shuffle: bool = True,
    ) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.process_index = process_index
        self.num_processes = num_processes
        self.seed = seed
        self.start_step = start_step
        self.total_steps = total_steps
        self.shuffle = shuffle
        self.steps_per_epoch = steps_per_epoch_for(num_examples, self.global_batch_size)
        self._cached_epoch: int | None = None
        self._cached_order: torch.Tensor | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes * self.accumulation_steps

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of the dataset visited in `epoch`."""
        if self._cached_epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(example_seed(self.seed, epoch, -1))
                self._cached_order = torch.randperm(self.num_examples, generator=generator)
            else:
                self._cached_order = torch.arange(self.num_examples)
            self._cached_epoch = epoch
        return self._cached_order

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accumulation_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
            order = self.order(epoch)
            step_start = step_in_epoch * self.global_batch_size
            for micro_batch in range(self.accumulation_steps):
                start = step_start + (micro_batch * self.num_processes + self.process_index) * self.batch_size
                yield [(epoch, int(index)) for index in order[start : start + self.batch_size]]


def steps_per_epoch_for(num_examples: int, global_batch_size: int) -> int:
    """Optimizer steps in one pass over `num_examples` images (the incomplete last batch is dropped)."""
    steps = num_examples // global_batch_size
    if steps < 1:
        raise ValueError(
            f"the dataset has {num_examples} images, fewer than one total batch of {global_batch_size} "
            "(--batch-size x processes x --gradient-accumulation-steps): lower the batch size"
        )
    return steps
