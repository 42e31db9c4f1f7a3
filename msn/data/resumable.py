"""A training data stream that a resumed run can continue exactly, whatever the number of workers.

Two pieces make the stream a pure function of ``(seed, epoch, position)``:

* :class:`ResumableSampler` shuffles with a generator seeded by ``seed + epoch`` (as
  :class:`~torch.utils.data.DistributedSampler` does, so each rank of a multi-GPU run gets its own
  share), can start part-way into an epoch, and hands every index out together with a per-sample
  seed;
* :class:`SeededDataset` seeds the augmentation of each sample with that seed.

No random state then lives in the DataLoader worker processes, so the checkpoint only has to
hold the epoch and the number of batches already consumed (see :func:`data_position`), and
changing ``num_workers`` between runs does not change a single pixel.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ResumableSampler", "SeededDataset", "batch_seed", "data_position", "sample_seed"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the augmentation of sample ``index`` in ``epoch``: well mixed, so that nearby
    indices or epochs do not get correlated random streams."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def batch_seed(seeds: torch.Tensor) -> int:
    """One seed for a whole batch from its per-sample seeds (the ``seed`` column that
    ``SeededDataset(return_seed=True)`` adds): the batched augmentation of ``augment_on=device``
    draws a batch's random numbers from it. Like the sample seeds, it depends only on the seed,
    the epoch and the indices, so it differs between ranks (disjoint indices) and a resumed run
    draws exactly what the uninterrupted one drew, whatever the global random state."""
    values = [int(v) for v in seeds.reshape(-1).tolist()]
    return int(np.random.SeedSequence(values).generate_state(1, dtype=np.uint64)[0] >> 1)


def data_position(epoch: int, batches_done: int, batches_per_epoch: int | float) -> tuple[int, int]:
    """``(epoch, batches already consumed in it)``, an epoch's end normalised to the next start.

    A checkpoint written after the last batch of epoch ``e`` resumes at ``(e + 1, 0)``: the
    DataLoader iterator of a resumed run is created before Lightning moves to the next epoch.
    """
    if batches_done >= batches_per_epoch:
        return epoch + 1, 0
    return epoch, max(0, batches_done)


class ResumableSampler(DistributedSampler):
    """Shuffled indices of one rank, ``(index, sample_seed)`` pairs, optionally starting mid-epoch.

    A :class:`~torch.utils.data.DistributedSampler` (which Lightning leaves in place instead of
    wrapping it) with ``num_replicas=1`` on a single device. The permutation of epoch ``e`` is
    seeded by ``seed + e`` (:meth:`set_epoch`, called by Lightning before every epoch);
    :meth:`set_position` skips the first batches of an epoch on resume.

    Args:
        dataset: the map-style dataset (only its length is used).
        batch_size: batch size of the loader, to turn consumed batches into samples.
        seed: shuffling and augmentation seed.
        num_replicas: number of ranks (1 without distributed training).
        rank: this rank.
        shuffle: shuffle every epoch (False: dataset order, for tests and debugging).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = int(batch_size)
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        # A new epoch starts from its first batch; the same epoch again (Lightning calls this
        # after a mid-epoch resume too) keeps the resume position.
        if epoch != self.epoch:
            self.start_batch = 0
        super().set_epoch(epoch)

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Continue at batch ``batches_done`` of ``epoch`` (what :func:`data_position` returns)."""
        super().set_epoch(epoch)
        self.start_batch = int(batches_done)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        indices = list(super().__iter__())[self.start_batch * self.batch_size :]
        for index in indices:
            yield index, sample_seed(self.seed, epoch, index)


class SeededDataset(Dataset):
    """``dataset[index]`` with the random number generator seeded by the sampler's per-sample seed.

    Keys from :class:`ResumableSampler` are ``(index, seed)`` pairs; plain integer keys are
    passed through unseeded. With ``return_seed`` the seed is appended to the sample
    (``(image, label, seed)``), for augmentations made later on whole batches (:func:`batch_seed`).
    Only torch's CPU generator is seeded (torchvision's transforms draw
    from it); its previous state is put back afterwards, so with ``num_workers=0`` the training
    process's random stream (e.g. the masking) is not disturbed by data loading.
    """

    def __init__(self, dataset: Dataset, return_seed: bool = False) -> None:
        self.dataset = dataset
        self.return_seed = return_seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        # fork_rng with devices=[] saves and restores the CPU generator only; seeding through
        # default_generator (not torch.manual_seed) leaves the CUDA generators alone.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            sample = self.dataset[index]
        return (*sample, seed) if self.return_seed else sample

    def __getattr__(self, name: str) -> Any:
        # Attributes such as ``classes`` or ``samples`` of the wrapped dataset stay reachable.
        if name == "dataset":  # not set yet (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
